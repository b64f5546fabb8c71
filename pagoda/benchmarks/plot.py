"""Benchmark plots (matplotlib, imported only when a plot is asked for): TTFT, TPOT and output
throughput of a `pagoda bench serve` sweep against the request rate, and the backends of one
`pagoda bench throughput` run side by side. Beside each FILE.png goes FILE.json, the data it was
drawn from."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

# Each panel of the serving plot: its y label, and the summary keys it draws (legend label: key).
_SERVE_PANELS = [
    ("TTFT (ms)", {"p50": "median_ttft_ms", "p99": "p99_ttft_ms"}),
    ("TPOT (ms)", {"p50": "median_tpot_ms", "p99": "p99_tpot_ms"}),
    ("output throughput (tokens/s)", {"output": "output_throughput"}),
]
# Each panel of the throughput plot: its y label and the result key it draws.
_THROUGHPUT_PANELS = [
    ("output throughput (tokens/s)", "output_tokens_per_second"),
    ("total throughput (tokens/s)", "tokens_per_second"),
    ("request throughput (requests/s)", "requests_per_second"),
]


def machine() -> str:
    """This machine in a few words: its CPU and cores, and its NVIDIA GPUs if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    words = f"{cpu}, {os.cpu_count()} cores"
    gpus = _gpu_names()
    return f"{words}, {len(gpus)}x {gpus[0]}" if gpus else words


def _gpu_names() -> list[str]:
    try:  # NVML reads the GPUs without initializing CUDA
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no package, no driver, no GPU: a CPU machine
        return []
    try:
        return [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def plot_serve_sweep(summaries: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """TTFT p50/p99, TPOT p50/p99 and output throughput against the request rate, one point per
    summary of `pagoda bench serve`; returns the data drawn (as also written beside the PNG)."""
    data = {
        "title": f"pagoda bench serve: {summaries[0]['model']} on {machine()}",
        "x_label": "request rate (requests/s)",
        "request_rate": [_rate_label(s["request_rate"]) for s in summaries],
        "panels": [
            {"y_label": y_label, "series": {name: [s.get(key) for s in summaries] for name, key in series.items()}}
            for y_label, series in _SERVE_PANELS
        ],
    }
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(data["panels"]), figsize=(5 * len(data["panels"]), 4.2))
    positions = range(len(summaries))  # evenly spaced: a rate of inf has no place on a number line
    for ax, panel in zip(axes, data["panels"]):
        for name, values in panel["series"].items():
            ax.plot(positions, [math.nan if v is None else v for v in values], marker="o", label=name)
        ax.set_xticks(list(positions), data["request_rate"])
        ax.set_xlabel(data["x_label"])
        ax.set_ylabel(panel["y_label"])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(figure, data, path)
    return data


def _rate_label(rate: float | str) -> str:
    return rate if isinstance(rate, str) else f"{rate:g}"  # "inf" comes as a string, as in the summary


def plot_throughput(results: list[dict[str, Any]], model: str, workload: str, path: str) -> dict[str, Any]:
    """The backends of one `pagoda bench throughput` run as bars (results as BenchResult.to_json
    gives them); returns the data drawn (as also written beside the PNG)."""
    data = {
        "title": f"pagoda bench throughput: {model}, {workload}, on {machine()}",
        "backends": [r["backend"] for r in results],
        "panels": [{"y_label": y_label, "values": [r[key] for r in results]} for y_label, key in _THROUGHPUT_PANELS],
    }
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(data["panels"]), figsize=(4.5 * len(data["panels"]), 4.2))
    for ax, panel in zip(axes, data["panels"]):
        bars = ax.bar(data["backends"], panel["values"], color="tab:blue")
        ax.bar_label(bars, fmt="%.1f")
        ax.set_xlabel("backend")
        ax.set_ylabel(panel["y_label"])
        ax.grid(axis="y", alpha=0.3)
    _save(figure, data, path)
    return data


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display is needed or opened
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, data: dict[str, Any], path: str) -> None:
    figure.suptitle(data["title"], fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)
    with open(Path(path).with_suffix(".json"), "w") as f:
        json.dump(data, f, indent=2)
