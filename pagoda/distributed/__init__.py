"""Tensor and pipeline parallelism: which rank this process is, its groups, and what they exchange."""
