"""scripts/quant_logit_error.py (issue 15's logit error of each method) on the CPU: a tiny Llama's
config with weights drawn at a trained scale, float32 the reference."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.tiny_models import save_tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "quant_logit_error.py"


def test_quantizing_more_of_the_model_moves_its_logits_more(tmp_path: Path) -> None:
    """The fp8 KV cache alone moves the logits least, fp8 weights (their activations too) more, and
    4-bit AWQ weights most; none leaves them as they were."""
    model = save_tiny_model("llama3", tmp_path)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(model), "--random", "--device", "cpu", "--dtype", "float32",
         "--group-size", "64", "--methods", "fp8 KV", "fp8", "awq"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        values = dict(re.findall(r"(\w+ \|\w+ diff\||same top token) ([\d.e+-]+)", line))
        if values:
            rows[line[:14].strip()] = {name: float(value) for name, value in values.items()}
    assert list(rows) == ["fp8 KV", "fp8", "awq"], done.stdout
    mean = {method: row["mean |logit diff|"] for method, row in rows.items()}
    assert 0 < mean["fp8 KV"] < mean["fp8"] < mean["awq"], rows
    for row in rows.values():
        assert row["max |logit diff|"] >= row["mean |logit diff|"] and 0 <= row["same top token"] <= 1, rows
