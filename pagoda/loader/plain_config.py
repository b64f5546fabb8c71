"""A model's Hugging Face config as plain values, for the engine core and its workers.

An architecture's own config class (LlamaConfig, ...) imports transformers' tokenizer modules
(transformers 5: utils/type_validators imports tokenization_utils_base, and with it `tokenizers`).
The front end loads the config once and ships its values on transformers' base class, which
imports no tokenizer; what needs transformers' model classes (a meta model, for dummy and GGUF
weights' names) gets the architecture's class back."""

from __future__ import annotations

from transformers import PretrainedConfig


def plain_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """The same attribute values on the base class (no __init__ runs: nothing is re-derived)."""
    return _with_class(hf_config, PretrainedConfig)


def architecture_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """The config on its architecture's class (`model_type`), whatever class it came on."""
    if type(hf_config) is not PretrainedConfig:
        return hf_config
    from transformers import AutoConfig

    return _with_class(hf_config, type(AutoConfig.for_model(hf_config.model_type)))


def _with_class(hf_config: PretrainedConfig, cls: type[PretrainedConfig]) -> PretrainedConfig:
    config = cls.__new__(cls)
    config.__dict__.update(hf_config.__dict__)
    return config
