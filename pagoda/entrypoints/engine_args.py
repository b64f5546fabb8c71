"""The engine's command-line flags, shared by `pagoda serve` and the benches: generated from
EngineConfig's fields, so each default and help text lives once, in pagoda/config.py."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, get_args, get_type_hints

from pagoda.config import EngineConfig


def add_engine_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model", "data_parallel_size")) -> None:
    """A flag for every EngineConfig field but those in `skip`, named as vLLM names them, with the
    field's default, type and help (config.py holds each once)."""
    for f in fields(EngineConfig):
        if f.name not in skip:
            add_engine_argument(parser, f.name)


def add_engine_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """The flag of one EngineConfig field (`pagoda generate` takes a few)."""
    f = next(f for f in fields(EngineConfig) if f.name == name)
    extras = dict(f.metadata)
    if "default" not in extras["help"] and f.default not in (None, False):
        extras["help"] += " (default: %(default)s)"
    names = [f"--{f.name.replace('_', '-')}", *extras.pop("aliases", ())]
    if "action" not in extras and "type" not in extras:
        extras["type"] = _scalar_type(get_type_hints(EngineConfig)[f.name])
    parser.add_argument(*names, default=f.default, **extras)


def _scalar_type(hint: Any) -> type:
    """int for `int | None`, and so on."""
    kinds = [kind for kind in get_args(hint) or (hint,) if kind is not type(None)]
    return kinds[0]


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags that are EngineConfig fields, by field name."""
    return {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
