"""vLLM's `--config FILE`: a YAML file of flags (`port: 8000`, `tensor-parallel-size: 2`,
`enable-prefix-caching: false`), read as if they were written on the command line before the
others, so that a flag given there too wins. Deployments keep their settings in such a file (a
Kubernetes ConfigMap, say) and start the server with `pagoda serve --config /etc/pagoda.yaml`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def expand_config_files(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with each `--config FILE` (or `--config=FILE`) replaced by the flags FILE holds, placed
    after the command (and its positional model, if one follows) so that later flags override them."""
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            if not path:
                parser.error("--config needs a YAML file")
            rest = argv[: i] + argv[i + 1 + (arg == "--config"):]
            command = _command_end(parser, rest)
            flags = config_flags(Path(path), _command_parser(parser, rest[:command]))
            return expand_config_files(parser, rest[:command] + flags + rest[command:])
    return argv


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """--config in the command's help (expand_config_files reads it before argparse does)."""
    parser.add_argument("--config", metavar="FILE",
                        help="a YAML file of this command's flags (port: 8000); flags given here override it")


def config_flags(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line flags a YAML config file stands for, checked against `parser`'s options."""
    try:
        settings = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SystemExit(f"error: --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"error: --config {path} is not valid YAML: {e}") from None
    if not isinstance(settings, dict):
        raise SystemExit(f"error: --config {path} must hold a mapping of flag names to values, as `port: 8000`")
    known = {option for action in parser._actions for option in action.option_strings}
    flags: list[str] = []
    for key, value in settings.items():
        flag = "--" + str(key).replace("_", "-")
        if flag not in known or flag == "--config":
            raise SystemExit(f"error: --config {path}: {key!r} is not a flag of `{parser.prog}`")
        flags.extend(_as_arguments(flag, value, known))
    return flags


def _as_arguments(flag: str, value: Any, known: set[str]) -> list[str]:
    """One setting as command-line words: true is the bare switch, false its --no- form (or
    nothing: a plain switch is off unless given), a list its items, a mapping its JSON."""
    if isinstance(value, bool):
        negated = "--no-" + flag[2:]
        return [flag] if value else [negated] if negated in known else []
    if isinstance(value, list):
        return [flag, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def _command_end(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Where the command words end in argv (`serve`, `bench throughput`), past a positional right
    after them (serve's model); the top level's own flags (--log-level debug) may come first."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 + _takes_value(parser, argv[i])
    current = parser
    while (sub := _subcommands(current)) is not None and i < len(argv) and argv[i] in sub:
        current, i = sub[argv[i]], i + 1
    if i < len(argv) and not argv[i].startswith("-") and _has_positional(current):
        i += 1
    return i


def _command_parser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        sub = _subcommands(parser)
        if sub is not None and word in sub:
            parser = sub[word]
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _takes_value(parser: argparse.ArgumentParser, arg: str) -> int:
    action = parser._option_string_actions.get(arg)
    return int(action is not None and action.nargs != 0 and "=" not in arg)


def _has_positional(parser: argparse.ArgumentParser) -> bool:
    return any(not a.option_strings and not isinstance(a, argparse._SubParsersAction) for a in parser._actions)
