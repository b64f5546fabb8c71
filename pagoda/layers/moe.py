"""The sparse MoE block of Mixtral and Qwen2/3-MoE: a router picks each token's top-k experts,
each a gated MLP, and their outputs are summed, weighted by the router's probabilities (renormalized
over the k where the model does so); Qwen2-MoE adds a shared expert scaled by a sigmoid gate.

Experts are held stacked, so one kernel serves them all: w13 [experts, 2 x inter, hidden] (each
expert's gate rows, then its up rows) and w2 [experts, hidden, inter]. With tensor parallelism each
rank holds its slice of every expert's intermediate dim and the partial sums are all-reduced; with
expert parallelism (parallel_state's `expert_parallel`) each rank of the EP group holds whole experts instead, a
token's other experts contributing zero there, and the same all-reduce sums them.

When the experts span the data-parallel replicas (the EP group is their DP x TP ranks) each
layer first all-gathers the replicas' token rows over the DP group, so that every rank routes
and runs its experts on all of them; the all-reduce over the EP group then sums every rank's
share, and each replica keeps its own rows. An all-gather and an all-reduce, as vLLM's naive
all-to-all does: gloo has no reduce-scatter, and an all-to-all of routed tokens would need the
routing exchanged first. A replica with nothing scheduled takes part with no rows
(`SparseMoeBlock.forward` on an empty batch: ModelRunner.execute_dummy_batch).

On CUDA the experts run as pagoda/kernels/fused_moe.py's grouped GEMM; elsewhere, and as its
reference, one matmul pair per expert over the tokens routed to it."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.distributed.comm import all_gather_rows, all_reduce
from pagoda.distributed.parallel_state import dp_group, ep_group, expert_parallel
from pagoda.layers.activation import get_act_and_mul
from pagoda.layers.linear import Shard, UnquantizedLinearMethod, _copy, even_shard
from pagoda.layers.mlp import GatedMLP
from pagoda.quantization.base import QuantizationConfig

# Per-expert checkpoint projections -> their part of the stacked experts (gate and up: w13's
# halves; down: w2). Mixtral names them w1/w3/w2, Qwen gate_proj/up_proj/down_proj.
_EXPERT_PARTS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [tokens, k] float32, expert ids [tokens, k]): the softmax's top k, as transformers
    routes (softmax in float32 over all experts, then top-k, then the optional renormalization)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def experts_torch(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
    act: nn.Module,
) -> torch.Tensor:
    """sum over k of weights[:, k] * expert_{ids[:, k]}(x); ids outside [0, experts) (another
    rank's experts) contribute nothing. The reference the fused kernel is tested against."""
    out = torch.zeros_like(x)
    for expert in ids.unique().tolist():
        if not 0 <= expert < w13.shape[0]:
            continue
        tokens, slots = (ids == expert).nonzero(as_tuple=True)
        h = act(F.linear(x[tokens], w13[expert]))
        y = F.linear(h, w2[expert]) * weights[tokens, slots, None].to(x.dtype)
        out.index_add_(0, tokens, y)
    return out


class FusedMoE(nn.Module):
    """The routed experts of one layer (router outside, as in the checkpoints). Loads the
    checkpoint tensors under its name: per expert ({e}.w1.weight, {e}.gate_proj.weight, ...) or
    stacked as transformers' meta model has them (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""

    # The weight loader hands this module every checkpoint tensor under its name.
    loads_checkpoint_subtree: ClassVar[bool] = True

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, hidden_act: str,
        renormalize: bool,
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        if expert_parallel():
            ep = ep_group()
            per_rank = num_experts // ep.size
            self.experts = Shard(ep.rank * per_rank, per_rank, num_experts)
            self.inter = Shard(0, intermediate_size, intermediate_size)
        else:
            self.experts = Shard(0, num_experts, num_experts)
            self.inter = even_shard(intermediate_size)
        local, inter = self.experts.size, self.inter.size
        self.w13 = nn.Parameter(torch.empty(local, 2 * inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(local, hidden_size, inter), requires_grad=False)
        self.hidden_act = hidden_act
        self.act = get_act_and_mul(hidden_act)

    @staticmethod
    def num_parameters(num_experts: int, hidden_size: int, intermediate_size: int) -> int:
        """Unsharded, without building the layer."""
        return num_experts * 3 * hidden_size * intermediate_size

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum, this rank's share before `all_reduce`; the caller reduces."""
        if not x.shape[0]:
            return torch.zeros_like(x)
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        ids = ids - self.experts.start  # local ids; another rank's experts fall outside [0, local)
        if x.is_cuda:
            from pagoda.kernels.fused_moe import fused_experts

            return fused_experts(x, self.w13, self.w2, weights, ids, self.hidden_act)
        return experts_torch(x, self.w13, self.w2, weights, ids, self.act)

    def load_weight(self, param_name: str, tensor: torch.Tensor, part: str | None = None) -> None:
        """param_name: the checkpoint name under this module ("3.w1.weight", "gate_up_proj")."""
        if param_name in ("gate_up_proj", "down_proj"):
            for expert, one in enumerate(tensor):
                self._load_expert(expert, param_name, one)
            return
        expert, proj, _ = param_name.split(".")
        self._load_expert(int(expert), proj, tensor)

    def _load_expert(self, expert: int, proj: str, tensor: torch.Tensor) -> None:
        local = expert - self.experts.start
        if not 0 <= local < self.experts.size:
            return  # another rank's expert
        inter = self.inter
        if proj == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=0)
            self._load_expert(expert, "gate_proj", gate)
            self._load_expert(expert, "up_proj", up)
            return
        part = _EXPERT_PARTS[proj]
        if part == "down":
            _copy(self.w2.data[local], tensor.narrow(1, inter.start, inter.size), f"expert {expert} {proj}")
            return
        rows = slice(0, inter.size) if part == "gate" else slice(inter.size, 2 * inter.size)
        _copy(self.w13.data[local, rows], tensor.narrow(0, inter.start, inter.size), f"expert {expert} {proj}")


def _check_experts_unquantized(quant_config: QuantizationConfig | None, expert_prefix: str) -> None:
    """The stacked experts run unquantized (quantizing at load leaves them so); a checkpoint that
    stores them quantized is refused."""
    if quant_config is None or not quant_config.quantizes_checkpoint:
        return
    if not isinstance(quant_config.linear_method(expert_prefix), UnquantizedLinearMethod):
        raise ValueError(
            f"the checkpoint quantizes the MoE experts ({expert_prefix}) with quantization={quant_config.name!r}: "
            "quantized experts are not supported yet (their shared expert and attention may be)"
        )


class SparseMoeBlock(nn.Module):
    """Router (`gate`), routed experts, and Qwen2-MoE's shared expert with its sigmoid gate where
    `shared_intermediate_size`. Named as the checkpoints name them (mlp.gate, mlp.experts,
    mlp.shared_expert, mlp.shared_expert_gate)."""

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, hidden_act: str,
        renormalize: bool, shared_intermediate_size: int = 0, quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        _check_experts_unquantized(quant_config, f"{prefix}.experts.0.gate_proj")
        self.ep, self.dp = ep_group(), dp_group()
        # The router (and the shared expert's gate) stay unquantized and whole on every rank: each
        # routes every token.
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, hidden_act, renormalize)
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(
                hidden_size, shared_intermediate_size, hidden_act, False, quant_config, f"{prefix}.shared_expert"
            )
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    @staticmethod
    def num_parameters(
        num_experts: int, hidden_size: int, intermediate_size: int, shared_intermediate_size: int
    ) -> int:
        """Unsharded, without building the layer."""
        routed = num_experts * hidden_size + FusedMoE.num_parameters(num_experts, hidden_size, intermediate_size)
        if not shared_intermediate_size:
            return routed
        return routed + GatedMLP.num_parameters(hidden_size, shared_intermediate_size) + hidden_size

    def input_quantization(self) -> None:
        """None: the router and the experts read the unquantized input."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: this replica's token rows (none in a dummy step); every rank of the EP group calls it
        together."""
        tokens, own = all_gather_rows(x, self.dp)  # x itself, when the experts stay in this replica
        out = self.experts(tokens, self.gate(tokens))
        if self.ep.size > 1:
            out = all_reduce(out, self.ep)
        out = out[own]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
