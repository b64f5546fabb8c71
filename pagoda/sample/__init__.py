"""Batched token sampling: pagoda.sample.sampler."""
