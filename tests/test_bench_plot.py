"""`pagoda bench serve --request-rate R1,R2,... --plot` against a tiny server and `pagoda bench
throughput --backend pagoda,hf --plot`: each run draws a PNG, and the data beside it (FILE.json)
holds the series the summaries measured."""

from __future__ import annotations

import json

import pytest

from pagoda.benchmarks.plot import machine
from pagoda.entrypoints.cli import build_parser, main
from tests.serving import MODEL, serving, tiny_model_args
from tests.tiny_models import save_tiny_model

pytest.importorskip("matplotlib", reason="--plot needs matplotlib")


def run(argv: list[str]):
    args = build_parser().parse_args(argv)
    return args.func(args)


def assert_png(path) -> None:
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 10_000


def test_serve_sweep_plots_each_rate(tmp_path):
    with serving(tiny_model_args(tmp_path), tmp_path / "server.log") as (_, base):
        summaries = run(["bench", "serve", "--base-url", base, "--num-prompts", "3", "--random-input-len", "8",
                         "--random-output-len", "4", "--request-rate", "20,inf", "--plot", str(tmp_path / "serve.png"),
                         "--result-file", str(tmp_path / "serve-result.json")])
    assert json.loads((tmp_path / "serve-result.json").read_text()) == summaries
    assert [s["request_rate"] for s in summaries] == [20.0, "inf"]
    assert [s["completed"] for s in summaries] == [3, 3]
    assert_png(tmp_path / "serve.png")
    data = json.loads((tmp_path / "serve.json").read_text())
    assert MODEL in data["title"] and machine() in data["title"]
    assert data["request_rate"] == ["20", "inf"] and data["x_label"] == "request rate (requests/s)"
    ttft, tpot, throughput = data["panels"]
    assert ttft == {"y_label": "TTFT (ms)", "series": {
        "p50": [s["median_ttft_ms"] for s in summaries], "p99": [s["p99_ttft_ms"] for s in summaries]}}
    assert tpot == {"y_label": "TPOT (ms)", "series": {
        "p50": [s["median_tpot_ms"] for s in summaries], "p99": [s["p99_tpot_ms"] for s in summaries]}}
    assert throughput == {"y_label": "output throughput (tokens/s)",
                          "series": {"output": [s["output_throughput"] for s in summaries]}}


def test_throughput_plots_the_backends_of_one_run(tmp_path):
    model = str(save_tiny_model("llama3", tmp_path))
    main(["bench", "throughput", "--model", model, "--backend", "pagoda,hf", "--num-prompts", "3", "--input-len", "8",
          "--output-len", "4", "--disable-tqdm", "--output-json", str(tmp_path / "result.json"),
          "--plot", str(tmp_path / "throughput.png")])
    results = json.loads((tmp_path / "result.json").read_text())
    assert [r["backend"] for r in results] == ["pagoda", "hf"]
    assert all(r["output_tokens"] == 12 for r in results)
    assert_png(tmp_path / "throughput.png")
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert model in data["title"] and machine() in data["title"]
    assert data["backends"] == ["pagoda", "hf"]
    assert data["panels"] == [
        {"y_label": "output throughput (tokens/s)", "values": [r["output_tokens_per_second"] for r in results]},
        {"y_label": "total throughput (tokens/s)", "values": [r["tokens_per_second"] for r in results]},
        {"y_label": "request throughput (requests/s)", "values": [r["requests_per_second"] for r in results]},
    ]


@pytest.mark.parametrize("argv, complaint", [
    (["bench", "serve", "--request-rate", "1,fast"], "not a comma-separated list"),
    (["bench", "serve", "--request-rate", "2,0"], "must be > 0"),
    (["bench", "throughput", "--backend", "pagoda,vllm"], "unknown backend"),
])
def test_bad_lists_are_refused(argv, complaint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and complaint in capsys.readouterr().err
