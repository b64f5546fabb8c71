"""Token proposers: where drafts for multi-token steps come from."""
