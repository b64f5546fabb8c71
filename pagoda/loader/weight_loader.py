"""Checkpoint tensors (Hugging Face names, whole) into this rank's share of any model, from what
its contract states (pagoda/models/interface.py): projections packed into one layer, tied
parameters, module aliases, tensors to ignore; a module that loads the tensors under its name
(an MoE layer's stacked experts) gets each of those whole; an fp8 KV cache's scales go to their
attention layers (pagoda/loader/kv_scales.py). Safetensors, .bin, GGUF and dummy weights all come through here.
Each layer keeps its TP slice (pagoda/layers/linear.py); tensors of another pipeline stage are
skipped. Once all are in, each linear layer's method prepares its weights for use."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagoda.layers.linear import load_param
from pagoda.loader.kv_scales import load_kv_scale
from pagoda.models.interface import CausalLM, PPMissingLayer


def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Fill every parameter of `model`; returns their names. Raises on a tensor with no place in
    the model, and on parameters the checkpoint leaves empty."""
    params = dict(model.named_parameters())  # a tied parameter held once appears once
    tied = model.tied_parameters()
    copies: dict[str, list[str]] = {}
    for param, source in tied.items():
        copies.setdefault(source, []).append(param)
    part_of = {proj: packed for packed, projs in model.packed_modules_mapping.items() for proj in projs}
    loaded: set[str] = set()
    for name, tensor in weights:
        name = parameter_name(model, name)
        if name.endswith(model.ignored_checkpoint_suffixes) or name in tied or load_kv_scale(model, name, tensor):
            continue  # a tied parameter is filled from its source, whether or not the checkpoint stores it
        # A copy held apart from its source (a tied LM head on a later stage than the embedding).
        for target in [name] + [copy for copy in copies.get(name, []) if copy in params]:
            subtree = _subtree_loader(model, target)
            if subtree is not None:
                prefix, module, rest = subtree
                module.load_weight(rest, tensor)
                loaded.update(f"{prefix}.{p}" for p, _ in module.named_parameters())
                continue
            param, part = _packed_target(target, part_of)
            if _held_elsewhere(model, param):
                continue
            if param not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
            module_path, _, param_name = param.rpartition(".")
            load_param(model.get_submodule(module_path), param_name, tensor, part)
            loaded.add(param)
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    return loaded


def _packed_target(name: str, part_of: dict[str, str]) -> tuple[str, str | None]:
    """(our parameter, its part) for a checkpoint tensor: a projection we pack goes into its
    part of the packed layer (q_proj -> qkv_proj, part q_proj)."""
    module_path, _, param_name = name.rpartition(".")
    parent, _, proj = module_path.rpartition(".")
    if proj in part_of:
        return f"{parent}.{part_of[proj]}.{param_name}", proj
    return name, None


def parameter_name(model: CausalLM, name: str) -> str:
    """A checkpoint tensor's name as the model's parameters (or packed parts of them) spell it."""
    name, aliases = model.checkpoint_name(name), model.checkpoint_module_aliases
    if not aliases:
        return name
    return ".".join(aliases.get(part, part) for part in name.split("."))


def _subtree_loader(model: nn.Module, name: str) -> tuple[str, nn.Module, str] | None:
    """(its path, the module, the name under it) where a module on the tensor's path loads the
    checkpoint tensors under its name itself (`loads_checkpoint_subtree`)."""
    parts = name.split(".")
    module: nn.Module | None = model
    for i, attr in enumerate(parts[:-1]):
        module = getattr(module, attr, None)
        if module is None or isinstance(module, PPMissingLayer):
            return None
        if getattr(module, "loads_checkpoint_subtree", False):
            return ".".join(parts[: i + 1]), module, ".".join(parts[i + 1 :])
    return None


def _held_elsewhere(model: nn.Module, param: str) -> bool:
    """Whether `param` lies in a module that another pipeline stage holds."""
    module: nn.Module | None = model
    for attr in param.split(".")[:-1]:
        module = getattr(module, attr, None)
        if module is None:
            return False
        if isinstance(module, PPMissingLayer):
            return True
    return False
