"""The CPU engine core's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE) unless the user
set the policy: spinning threads starve the front end on a machine of few cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serving import engine_core_pid, serving, tiny_model_args


def _core_environment(server_pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{engine_core_pid(server_pid)}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.parametrize("user_policy", [None, "ACTIVE"])
def test_engine_core_openmp_wait_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_policy: str | None
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = None if user_policy is None else {"OMP_WAIT_POLICY": user_policy}
    with serving(tiny_model_args(tmp_path), tmp_path / "server.log", env) as (proc, _):
        assert _core_environment(proc.pid).get("OMP_WAIT_POLICY") == (user_policy or "PASSIVE")
