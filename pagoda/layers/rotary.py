"""Rotary position embedding (the "rotate half" layout of Llama-family checkpoints), with the
scaling schemes their configs name, over the whole head or its first `partial_rotary_factor` of it.

LongRoPE (Phi-3, "longrope" / "su") has two sets of frequencies: a request's tokens are rotated by
the short set while the request is within the pretraining length (original_max_position_embeddings)
and by the long set once it is longer, as transformers chooses for the sequence it runs. Both
tables are held one after the other; `table_index` picks each token's row."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagoda.attention.backend import AttentionMetadata
from pagoda.kernels import cpu_native


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope settings of a config, whichever transformers version produced it: newer ones keep
    theta and scaling together in `rope_parameters`, older ones in `rope_theta` + `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if params["rope_type"] in ("longrope", "su"):
        params["rope_type"] = "longrope"
        # Older configs keep the pretraining length beside the scaling, not in it.
        params.setdefault("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
        params.setdefault("max_position_embeddings", getattr(config, "max_position_embeddings", None))
    if "partial_rotary_factor" not in params and getattr(config, "partial_rotary_factor", None) is not None:
        params["partial_rotary_factor"] = config.partial_rotary_factor
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _longrope_inv_freqs(rotary_dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(short, long) frequencies: the base ones divided by each set's per-dimension factors."""
    base = float(params["rope_theta"])
    inv_freq_shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return tuple(
        1.0 / (torch.tensor(params[which], dtype=torch.float32) * base**inv_freq_shape)
        for which in ("short_factor", "long_factor")
    )


def _longrope_attention_factor(params: dict[str, Any]) -> float:
    """The cos/sin magnitude (the paper's mscale), from the context's extension factor."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_position_embeddings"] / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def compute_inv_freq(rotary_dim: int, params: dict[str, Any]) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq.float()
    if rope_type == "linear":
        return (inv_freq / params["factor"]).float()
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params).float()
    raise ValueError(
        f"rope_type={rope_type!r} is not supported; supported: 'default', 'linear', 'llama3', 'longrope'"
    )


def _cos_sin(inv_freq: torch.Tensor, max_position: int, magnitude: float = 1.0) -> torch.Tensor:
    """[max_position, rotary_dim]: cos | sin halves, gathered by position each step."""
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos() * magnitude, freqs.sin() * magnitude], dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.max_position = max_position
        self.original_max_position: int | None = None
        if params["rope_type"] == "longrope":
            self.original_max_position = params["original_max_position_embeddings"]
            magnitude = _longrope_attention_factor(params)
            short, long = _longrope_inv_freqs(self.rotary_dim, params)
            table = torch.cat([_cos_sin(short, max_position, magnitude), _cos_sin(long, max_position, magnitude)])
        else:
            table = _cos_sin(compute_inv_freq(self.rotary_dim, params), max_position)
        self.register_buffer("cos_sin", table, persistent=False)
        self._rotation_table: torch.Tensor | None = None  # _rotation_rows'

    def table_index(self, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Each token's row of `cos_sin`: its position, in the long table (LongRoPE) when its
        request is longer than the pretraining length after this step."""
        if self.original_max_position is None:
            return positions
        tokens = torch.arange(positions.shape[0], device=positions.device, dtype=metadata.query_start_loc.dtype)
        request = torch.searchsorted(metadata.query_start_loc[1:], tokens, right=True)
        seq_len = metadata.seq_lens[request.clamp_max(metadata.seq_lens.shape[0] - 1)]
        return positions + (seq_len > self.original_max_position) * self.max_position

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D] -> rotated (in place on CUDA and by the CPU's C kernel,
        copies elsewhere). positions: rows of `cos_sin` (table_index)."""
        if q.is_cuda:
            from pagoda.kernels.elementwise import rotary_inplace

            rotary_inplace(positions, q, k, self.cos_sin)
            return q, k
        if (
            cpu_native.elementwise_serves(q, k, self.cos_sin) and _heads_packed(q) and _heads_packed(k)
            and positions.dtype == torch.int64 and positions.is_contiguous()
        ):
            cpu_native.rotary_inplace(positions, q, k, self.cos_sin)
            return q, k
        return self._rotate(q, k, self._rotation_rows(positions).unsqueeze(1))

    def _rotation_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """The CPU path's (cos | cos | -sin | sin) rows at `positions`, from a table built once
        (on the CPU only: a long-context model's table is large)."""
        if torch.compiler.is_compiling():  # (no state built inside a compiled forward)
            return _signed(self.cos_sin[positions])
        if self._rotation_table is None:
            self._rotation_table = _signed(self.cos_sin)
        return self._rotation_table[positions]

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated as one tensor (half the ops: per-op overhead is most of a small CPU
        step) by `_signed` rows [T, 1, 2R]: x * cos + (x2 | x1) * (-sin | sin) is rotate-half's
        x1 * cos - x2 * sin | x2 * cos + x1 * sin, rounded the same."""
        cos, signed_sin = rows.chunk(2, dim=-1)
        x = torch.cat([q, k], dim=1)
        partial = self.rotary_dim < x.shape[-1]  # the rest of each head passes through (Phi-4-mini)
        head = (x[..., : self.rotary_dim] if partial else x).float()
        x1, x2 = head.chunk(2, dim=-1)
        out = (head * cos + torch.cat([x2, x1], dim=-1) * signed_sin).to(x.dtype)
        if partial:
            out = torch.cat([out, x[..., self.rotary_dim :]], dim=-1)
        return out[:, : q.shape[1]], out[:, q.shape[1] :]


def _heads_packed(x: torch.Tensor) -> bool:
    """Whether x [T, H, D]'s heads lie D values apart, each contiguous (as the C rotary reads them)."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


def _signed(cos_sin: torch.Tensor) -> torch.Tensor:
    """cos | sin rows [.., R] -> cos | cos | -sin | sin [.., 2R], the factors `_rotate` takes."""
    cos, sin = cos_sin.chunk(2, dim=-1)
    return torch.cat([cos, cos, -sin, sin], dim=-1)


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL's M-RoPE: the rotary dimensions in three sections (mrope_section, in pairs)
    rotated by a token's temporal, height and width positions. Given positions [3, T] (a prefill
    chunk with images) `table_index` gathers each token's cos|sin row from its three positions
    into a per-step table, which `forward` reads row by row; 1-D positions (text, decodes, CUDA
    graphs) are a token's three equal positions and read the table as plain rope does."""

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any], sections: list[int]) -> None:
        super().__init__(head_dim, max_position, params)
        half = self.rotary_dim // 2
        section_of = torch.repeat_interleave(torch.arange(len(sections)), torch.tensor(sections))[:half]
        self.register_buffer("section_of", torch.cat([section_of, section_of]), persistent=False)

    def table_index(self, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        if positions.dim() == 1:
            return positions
        rows = self.cos_sin[positions]  # [3, T, rotary_dim]
        return rows.gather(0, self.section_of.expand(1, rows.shape[1], -1)).squeeze(0)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not positions.is_floating_point():
            return super().forward(positions, q, k)
        table, rows = positions, torch.arange(positions.shape[0], device=positions.device)
        if q.is_cuda:
            from pagoda.kernels.elementwise import rotary_inplace

            rotary_inplace(rows, q, k, table.contiguous())
            return q, k
        return self._rotate(q, k, _signed(table).unsqueeze(1))
