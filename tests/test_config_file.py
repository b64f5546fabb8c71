"""vLLM's `--config FILE`: a YAML file of a command's flags, overridden by the flags given beside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.config_file import expand_config_files
from tests.test_run_batch import _tiny_model, line


def _parse(argv: list[str]):
    parser = build_parser()
    return parser.parse_args(expand_config_files(parser, argv))


def test_a_config_file_sets_flags_and_the_command_line_overrides_them(tmp_path: Path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "port: 9001\nmax_num_seqs: 8\nenable-prefix-caching: false\nenforce-eager: true\n"
        "served-model-name: [a, b]\nmax-model-len: 32k\n"
        "speculative-config: {method: ngram, num_speculative_tokens: 3}\n"
    )
    args = _parse(["--log-level", "warning", "serve", "my-model", "--config", str(config), "--port", "7"])
    assert args.port == 7 and args.model_tag == "my-model" and args.log_level == "warning"
    assert args.max_num_seqs == 8 and args.max_model_len == 32_000
    assert args.enable_prefix_caching is False and args.enforce_eager is True
    assert args.served_model_name == ["a", "b"]
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    # Given before --config, a flag still wins; without the file, the defaults are back.
    assert _parse(["serve", "--port", "7", f"--config={config}"]).port == 7
    assert _parse(["serve"]).port == 8000 and _parse(["serve"]).enable_prefix_caching is True


@pytest.mark.parametrize("text, message", [
    ("no-such-flag: 1\n", "'no-such-flag' is not a flag of `pagoda serve`"),
    ("port: [1\n", "is not valid YAML"),
    ("- port\n", "must hold a mapping"),
    ("config: other.yaml\n", "'config' is not a flag"),
])
def test_a_bad_config_file_is_refused_naming_it(tmp_path: Path, text: str, message: str):
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit, match=message):
        _parse(["serve", "--config", str(config)])
    with pytest.raises(SystemExit, match="No such file"):
        _parse(["serve", "--config", str(tmp_path / "missing.yaml")])


def test_run_batch_takes_its_files_and_model_from_a_config_file(tmp_path: Path):
    model = _tiny_model(tmp_path)
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    requests.write_text(line("one", "/v1/completions", {"prompt": "hello", "max_tokens": 3, "temperature": 0}) + "\n")
    config = tmp_path / "batch.yaml"
    config.write_text(f"input-file: {requests}\noutput-file: {results}\nmodel: {model}\ndevice: cpu\nmax-model-len: 256\n")
    done = subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", "run-batch", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    (out,) = [json.loads(text) for text in results.read_text().splitlines()]
    assert out["custom_id"] == "one" and out["response"]["status_code"] == 200
    assert out["response"]["body"]["usage"]["completion_tokens"] == 3
