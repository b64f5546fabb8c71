"""Images in, through the same engine: what a request carries for its images (inputs.py), how the
front end turns images into those inputs with the model's own transformers processor
(processing.py), where images come from in a chat (media.py), and the runner's per-request cache
of encoder outputs (encoder_cache.py). docs/multimodal.md describes the design."""
