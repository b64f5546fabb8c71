"""Embedding models' pooling: how a prompt's final hidden states become one vector.

`PoolerConfig` is read once (config/resolve.py) from the model's sentence-transformers files
(`modules.json`, its Pooling module's `config.json`) where present; without them a decoder's
embedding is its last token's hidden state, normalized (vLLM's default for Qwen3-Embedding-style
models), an encoder's (BERT) its first token's ([CLS]), normalized. The engine core's runner
reduces each prompt's hidden states to one vector (worker/pooler.py); the front end then
truncates it to the requested `dimensions` (Matryoshka models only) and normalizes it
(`embedding`), in that order, as vLLM's embedding head does.

A sequence-classification model (a cross-encoder) pools its first token through its head: its
pooled vector is its labels' logits, which the front end makes probabilities (`probabilities`),
or leaves raw where the request's `use_activation` is false (vLLM's)."""

from __future__ import annotations

import array
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POOLING_TYPES = ("LAST", "MEAN", "CLS")
# sentence-transformers' Pooling config switch -> our pooling type.
_ST_POOLING_MODES = {
    "pooling_mode_lasttoken": "LAST",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_cls_token": "CLS",
}
_ST_MODULES = ("Transformer", "Pooling", "Normalize")
_MIN_NORM = 1e-12  # torch.nn.functional.normalize's eps


@dataclass
class PoolingParams:
    """vLLM's per-request pooling settings: the vector's length (Matryoshka models), whether
    to L2-normalize it (None: as the model's config says), and whether a classifier's logits go
    through its activation (sigmoid or softmax; None: they do) or come back raw. A score by
    cosine similarity (an embedding model's) is the same either way."""

    dimensions: int | None = None
    normalize: bool | None = None
    use_activation: bool | None = None


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: str  # one of POOLING_TYPES
    normalize: bool  # L2-normalize the (truncated) vector
    # Matryoshka models: the vector's prefixes are embeddings too (`dimensions`); the sizes the
    # model names, or () for any.
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()
    # A sequence-classification model's labels, by index (config.json's id2label); () for an
    # embedding model.
    labels: tuple[str, ...] = ()


def classifier_config(hf_config: Any) -> PoolerConfig:
    """The pooling of a sequence-classification model: its first token, through its head."""
    id2label = getattr(hf_config, "id2label", None) or {0: "LABEL_0", 1: "LABEL_1"}
    labels = tuple(str(label) for _, label in sorted(id2label.items(), key=lambda item: int(item[0])))
    return PoolerConfig("CLS", False, labels=labels)


# What each pooling API needs of the model: an embedding model, a classifier, or either (score).
_TASK_NEEDS = {"embed": False, "classify": True, "score": None}


def check_task(config: PoolerConfig, task: str, model_name: str) -> None:
    """ValueError naming the model when it cannot serve `task` (embed, classify or score): a
    classifier gives no embeddings, an embedding model no label probabilities, and a score is one
    label's (vLLM's cross-encoders) or two embeddings' cosine similarity."""
    classifier = bool(config.labels)
    needs = _TASK_NEEDS[task]
    if needs is not None and needs != classifier:
        kind = "a sequence-classification model (a cross-encoder)" if classifier else "an embedding model"
        other = "embeddings" if classifier else "label probabilities (classify)"
        raise ValueError(f"model {model_name!r} is {kind}: it gives no {other}")
    if task == "score" and classifier and len(config.labels) != 1:
        raise ValueError(
            f"model {model_name!r} has {len(config.labels)} labels: a score is the probability of a model with one "
            "(num_labels=1, as cross-encoders have); classify gives its labels' probabilities"
        )


def probabilities(logits: list[float], use_activation: bool | None = None) -> list[float]:
    """A classifier's label probabilities, as vLLM's: the sigmoid of a single logit (a
    cross-encoder's relevance), else the softmax over the labels; the logits themselves when
    use_activation is False (vLLM's switch; None is True). Computed in Python's floats (a few
    labels do not pay for torch, which the server's front end does not load), given as float32s."""
    if use_activation is False:
        return list(logits)
    if len(logits) == 1:
        return float32s([_sigmoid(logits[0])])
    top = max(logits)  # exponents of at most 0: none overflows
    exps = [math.exp(x - top) for x in logits]
    total = math.fsum(exps)
    return float32s([e / total for e in exps])


def float32s(values: Iterable[float]) -> list[float]:
    """values rounded to float32, as the engine's tensors hold them (base64 embeddings too)."""
    return array.array("f", values).tolist()


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)  # for x < 0, exp(-x) could overflow
    return e / (1.0 + e)


def read_pooler_config(model_dir: Path, hf_config: Any, default_pooling_type: str = "LAST") -> PoolerConfig:
    """The pooling a model's sentence-transformers files describe, else the model's default
    (normalized); ValueError for a module or pooling mode Pagoda does not run."""
    dimensions = tuple(getattr(hf_config, "matryoshka_dimensions", None) or ())
    matryoshka = bool(dimensions) or bool(getattr(hf_config, "is_matryoshka", False))
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return PoolerConfig(default_pooling_type, True, matryoshka, dimensions)
    modules = json.loads(modules_file.read_text())
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    unknown = sorted(set(kinds) - set(_ST_MODULES))
    if unknown:
        raise ValueError(f"{modules_file} has sentence-transformers modules Pagoda does not run: {unknown}")
    pooling_type = default_pooling_type
    if "Pooling" in kinds:
        pooling_file = model_dir / kinds["Pooling"]["path"] / "config.json"
        pooling_type = _st_pooling_type(json.loads(pooling_file.read_text()), pooling_file)
    return PoolerConfig(pooling_type, "Normalize" in kinds, matryoshka, dimensions)


def _st_pooling_type(config: dict[str, Any], source: Path) -> str:
    modes = [name for name, on in config.items() if name.startswith("pooling_mode_") and on]
    if len(modes) != 1 or modes[0] not in _ST_POOLING_MODES:
        raise ValueError(
            f"{source}: pooling modes {modes} are not supported; one of {sorted(_ST_POOLING_MODES)} must be set"
        )
    return _ST_POOLING_MODES[modes[0]]


def check_dimensions(config: PoolerConfig, model_name: str, dimensions: int | None) -> None:
    """ValueError naming `dimensions` when the model cannot give vectors of that size."""
    if dimensions is None:
        return
    if not config.is_matryoshka:
        raise ValueError(
            f"dimensions={dimensions} is invalid: model {model_name!r} does not support Matryoshka representation, "
            "so its vectors cannot be shortened"
        )
    if dimensions < 1:
        raise ValueError(f"dimensions={dimensions} is invalid: it must be >= 1")
    if config.matryoshka_dimensions and dimensions not in config.matryoshka_dimensions:
        raise ValueError(
            f"dimensions={dimensions} is invalid: model {model_name!r} supports only {list(config.matryoshka_dimensions)}"
        )


def embedding(pooled: list[float], config: PoolerConfig, params: PoolingParams) -> list[float]:
    """The embedding of a pooled vector: its first `dimensions` values, L2-normalized unless the
    request or else the model's config says not to (a norm under 1e-12 counts as 1e-12, as
    torch's normalize), as float32s."""
    vector = pooled[: params.dimensions]
    if not (config.normalize if params.normalize is None else params.normalize):
        return list(vector)
    norm = max(math.hypot(*vector), _MIN_NORM)
    return float32s(x / norm for x in vector)
