"""Model ids from the Hugging Face cache, offline: vLLM's --revision picks a branch, tag or commit's
snapshot and --download-dir the cache to look in."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda import LLM, SamplingParams
from pagoda.loader.model_resolver import resolve_model
from tests.tiny_models import save_tiny_model

MAIN, TAGGED = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache holding acme/tiny at two commits: main, and the tag v2 (other weights)."""
    root = tmp_path_factory.mktemp("hf-cache")
    repo = root / "models--acme--tiny"
    (repo / "snapshots").mkdir(parents=True)
    for commit, seed in ((MAIN, 0), (TAGGED, 1)):
        save_tiny_model("llama3", root / commit, seed=seed).rename(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(TAGGED)
    return root


def test_revision_and_download_dir_pick_the_snapshot(cache: Path):
    snapshots = cache / "models--acme--tiny" / "snapshots"
    assert resolve_model("acme/tiny", download_dir=str(cache)).model_dir == snapshots / MAIN
    assert resolve_model("acme/tiny", revision="v2", download_dir=str(cache)).model_dir == snapshots / TAGGED
    assert resolve_model("acme/tiny", revision=TAGGED, download_dir=str(cache)).model_dir == snapshots / TAGGED
    with pytest.raises(FileNotFoundError, match=f"at revision 'v3' .*{cache}"):
        resolve_model("acme/tiny", revision="v3", download_dir=str(cache))
    with pytest.raises(FileNotFoundError, match="neither a local path nor a model in the Hugging Face cache"):
        resolve_model("acme/tiny")  # not in the default cache


def test_the_engine_runs_the_revision_asked_for(cache: Path):
    """The tag's weights, not main's: the same greedy tokens as the snapshot's folder given by path."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 9, 2, 7]}

    def tokens(model: str, **kwargs) -> list[int]:
        llm = LLM(model=model, device="cpu", skip_tokenizer_init=True, max_model_len=64, **kwargs)
        return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids

    snapshots = cache / "models--acme--tiny" / "snapshots"
    tagged = tokens("acme/tiny", revision="v2", download_dir=str(cache))
    assert tagged == tokens(str(snapshots / TAGGED))
    assert tagged != tokens(str(snapshots / MAIN))
