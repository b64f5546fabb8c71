"""A worker's adapters: the model's target layers wrapped (layers.py), --max-loras device slots
filled least recently used first, over a CPU cache of --max-cpu-loras adapters read from disk.

Each step the runner names every chunk's adapter; the manager makes them resident (evicting only
adapters the step does not use: the scheduler never mixes more than there are slots) and writes
each token's slot into the LoRA context the layers read."""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from pagoda.config.model_spec import ModelSpec
from pagoda.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagoda.lora.config import LoRAConfig
from pagoda.lora.layers import LoRAContext, LoRALinearMethod
from pagoda.lora.peft import (
    TARGETS,
    LoRAWeights,
    PeftAdapter,
    check_adapter,
    load_peft_adapter,
    module_shapes,
)
from pagoda.lora.request import LoRARequest

# A target layer's path in the model: "model.layers.<i>." then one of TARGETS' layers.
_LAYER_PATHS = sorted({re.escape(path) for path, _ in TARGETS.values()})
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(" + "|".join(_LAYER_PATHS) + ")$")


class _TargetLayer:
    """One wrapped layer: the checkpoint modules it holds (one per part) and how to shard them."""

    def __init__(self, layer_index: int, layer: ColumnParallelLinear | RowParallelLinear, targets: list[str],
                 method: LoRALinearMethod) -> None:
        self.layer_index = layer_index
        self.layer = layer
        self.targets = targets
        self.method = method

    def shard(self, target: str, weights: LoRAWeights) -> LoRAWeights:
        """This rank's share: a column-parallel part's B rows, a row-parallel layer's A columns."""
        if isinstance(self.layer, RowParallelLinear):
            s = self.layer.input_shard
            return LoRAWeights(weights.a.narrow(1, s.start, s.size), weights.b)
        s = self.layer.parts[target]
        return LoRAWeights(weights.a, weights.b.narrow(0, s.start, s.size))


class LoRAManager:
    def __init__(
        self, model: nn.Module, config: LoRAConfig, spec: ModelSpec, max_tokens: int, device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.config = config
        self.spec = spec
        self.context = LoRAContext(max_tokens, config.max_loras, device)
        self.layers = _wrap_target_layers(model, self.context, config, spec, dtype, device)
        if not self.layers:
            raise ValueError(f"enable_lora: {spec.architecture} has no layers LoRA adapters can target")
        self.slots: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self.cpu_cache: OrderedDict[int, PeftAdapter] = OrderedDict()

    def set_batch(self, loras: list[LoRARequest | None], query_lens: list[int]) -> None:
        """Make the chunks' adapters resident and give each token its slot."""
        slot_of = self._activate({r.lora_int_id: r for r in loras if r is not None})
        self.context.set_batch([-1 if r is None else slot_of[r.lora_int_id] for r in loras], query_lens)

    def _activate(self, wanted: dict[int, LoRARequest]) -> dict[int, int]:
        if len(wanted) > self.config.max_loras:
            raise RuntimeError(f"a step mixes {len(wanted)} adapters, more than max_loras={self.config.max_loras}")
        for adapter_id in wanted:  # used now: the most recently used, on the device and in the cache
            if adapter_id in self.slots:
                self.slots.move_to_end(adapter_id)
            if adapter_id in self.cpu_cache:
                self.cpu_cache.move_to_end(adapter_id)
        for adapter_id, request in wanted.items():
            if adapter_id not in self.slots:
                self._load(adapter_id, self._free_slot(), request)
        return {adapter_id: self.slots[adapter_id] for adapter_id in wanted}

    def _free_slot(self) -> int:
        """An unused slot, else the least recently used adapter's (never one this step uses: those
        were just moved to the end)."""
        if len(self.slots) < self.config.max_loras:
            return min(set(range(self.config.max_loras)) - set(self.slots.values()))
        _, slot = self.slots.popitem(last=False)
        return slot

    def _load(self, adapter_id: int, slot: int, request: LoRARequest) -> None:
        adapter = self._read(adapter_id, request)
        for target_layer in self.layers:
            parts = []
            for target in target_layer.targets:
                weights = adapter.modules.get((target_layer.layer_index, target))
                parts.append(None if weights is None else target_layer.shard(target, weights))
            target_layer.method.set_slot(slot, parts)
        self.slots[adapter_id] = slot

    def _read(self, adapter_id: int, request: LoRARequest) -> PeftAdapter:
        """From the CPU cache, else from disk (the least recently used cached adapter makes room)."""
        adapter = self.cpu_cache.get(adapter_id)
        if adapter is None:
            adapter = load_peft_adapter(request.lora_path, self.config.max_lora_rank)
            check_adapter(adapter, self.spec)
            if len(self.cpu_cache) >= self.config.max_cpu_loras:
                self.cpu_cache.popitem(last=False)
            self.cpu_cache[adapter_id] = adapter
        return adapter


def _wrap_target_layers(
    model: nn.Module, context: LoRAContext, config: LoRAConfig, spec: ModelSpec, dtype: torch.dtype,
    device: torch.device,
) -> list[_TargetLayer]:
    shapes = module_shapes(spec)  # the layers' own weights may be quantized: their shapes say nothing
    wrapped = []
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        if match is None or not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        if isinstance(module, ColumnParallelLinear):
            targets = list(module.parts)
            rows = [module.parts[t].size for t in targets]
            in_features = shapes[targets[0]][0]
        else:
            targets = [match.group(2).rsplit(".", 1)[-1]]
            rows = [shapes[targets[0]][1]]
            in_features = module.input_shard.size
        module.linear_method = LoRALinearMethod(
            module.linear_method, context, config.max_loras, config.max_lora_rank, in_features, rows, dtype, device
        )
        wrapped.append(_TargetLayer(int(match.group(1)), module, targets, module.linear_method))
    return wrapped
