"""benchmarks/decode_revisions.py: a revision's Phantom attention code runs beside the working tree's on the same
tensors (at HEAD both give the same tokens), and a revision git cannot show is refused by name."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("decode_revisions", REPO / "benchmarks" / "decode_revisions.py")
decode_revisions = importlib.util.module_from_spec(_spec)

TINY = ["--layers", "2", "--hidden-size", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--intermediate-size", "64", "--vocab-size", "300", "--context", "12", "--new-tokens", "3",
        "--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu"]


def _in_git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _in_git_checkout(), reason="needs a git checkout of phantom-hf (it reads a revision's file)")


@pytest.fixture(scope="module", autouse=True)
def _load() -> None:
    _spec.loader.exec_module(decode_revisions)


def test_head_revision_runs_beside_the_working_tree_with_equal_tokens() -> None:
    from phantom_hf.modeling import modeling_phantom

    mixin = decode_revisions.mixin_at_revision("HEAD")
    assert mixin is not modeling_phantom.PhantomAttentionMixin and mixin.__module__.endswith("_modeling_at_revision")
    # HEAD, not the default HEAD~1: the previous commit's methods may read attributes this tree no longer sets
    rows = decode_revisions.main([*TINY, "--base", "HEAD"])  # raises SystemExit when the two Phantom variants' tokens differ
    assert {row.variant for row in rows} >= {"plain-matched", "phantom", "phantom@base", "phantom@base - phantom"}


def test_a_revision_git_cannot_show_is_refused_by_name() -> None:
    with pytest.raises(SystemExit, match="--base 'no-such-revision'"):
        decode_revisions.mixin_at_revision("no-such-revision")
