"""The command line: every flag of every `pagoda` command says what it does, and the engine's flags
are EngineConfig's fields, with its defaults (one place holds each)."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from pagoda.config import EngineConfig
from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.engine_args import engine_kwargs


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("pagoda",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_flag_has_help_text():
    missing = [
        f"{' '.join(path)} {action.option_strings or action.dest}"
        for path, parser in _commands(build_parser())
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help
    ]
    assert not missing


@pytest.mark.parametrize("command", [["serve"], ["bench", "throughput"], ["bench", "latency"]])
def test_engine_flags_default_to_engine_config(command):
    args = build_parser().parse_args(command)
    given = engine_kwargs(args)
    defaults = {f.name: f.default for f in fields(EngineConfig)}
    assert given and all(given[name] == defaults[name] for name in given if name != "model")
    skipped = {"model"} | ({"data_parallel_size"} if command != ["serve"] else set())
    assert set(given) | skipped == set(defaults)


def test_engine_flags_parse_to_config_values():
    args = build_parser().parse_args([
        "serve", "m", "--max-num-seqs", "3", "--no-enable-prefix-caching", "--enforce-eager", "-tp", "2",
        "--gpu-memory-utilization", "0.5", "--dtype", "float16", "--no-async-scheduling", "-O3",
    ])
    config = EngineConfig(**engine_kwargs(args))
    assert (config.max_num_seqs, config.enable_prefix_caching, config.enforce_eager, config.tensor_parallel_size,
            config.gpu_memory_utilization, config.dtype, config.async_scheduling, config.optimization_level) == (
        3, False, True, 2, 0.5, "float16", False, 3)
    assert build_parser().parse_args(["serve", "--optimization-level", "0"]).optimization_level == 0
    with pytest.raises(SystemExit):  # argparse names the flag and the choices
        build_parser().parse_args(["serve", "-O4"])
    with pytest.raises(ValueError, match="optimization_level=4 is invalid"):
        EngineConfig(optimization_level=4)


@pytest.mark.parametrize("text, value", [
    ("2048", 2048), ("32k", 32_000), ("32K", 32_768), ("25.6k", 25_600), ("1m", 10**6), ("8G", 8 * 2**30),
])
def test_sizes_take_vllms_human_readable_suffixes(text, value):
    args = build_parser().parse_args(
        ["serve", "--max-model-len", text, "--max-num-batched-tokens", text, "--kv-cache-memory-bytes", text]
    )
    assert args.max_model_len == args.max_num_batched_tokens == args.kv_cache_memory_bytes == value


@pytest.mark.parametrize("flag, text", [
    ("--max-model-len", "1.5K"), ("--max-model-len", "32x"), ("--max-model-len", ""),
    ("--port", "99999"), ("--port", "-1"), ("--port", "http"),
])
def test_a_bad_size_or_port_is_refused_naming_the_flag(flag, text, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", flag, text])
    assert f"argument {flag}:" in capsys.readouterr().err


def test_the_benches_take_vllms_dataset_and_warm_up_flags():
    throughput = build_parser().parse_args(
        ["bench", "throughput", "--dataset-name", "random", "--random-input-len", "7", "--random-output-len", "3"]
    )
    assert (throughput.dataset_name, throughput.input_len, throughput.output_len) == ("random", 7, 3)
    assert build_parser().parse_args(["bench", "latency", "--num-iters-warmup", "0"]).num_iters_warmup == 0


@pytest.mark.parametrize("argv, command", [
    (["serve", "model"], "serve"), (["--log-level", "debug", "serve"], "serve"),
    (["--log-level=info", "serve"], "serve"), (["bench", "serve", "--base-url", "x"], "bench"),
    (["--log-level", "serve", "generate"], "generate"), (["-h"], None),
])
def test_the_command_is_known_before_the_parser_is_built(argv, command):
    # `pagoda serve` starts its core server (torch, the engine) before building the parser, whose
    # imports take seconds; no other command starts one.
    from pagoda.entrypoints.cli import _command

    assert _command(argv) == command
