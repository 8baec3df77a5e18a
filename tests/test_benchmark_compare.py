"""benchmarks/compare.py: which rows count as a regression (the BENCHMARKS.md rule)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_compare", REPO / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def write_result(path: Path, benchmark: str, medians: dict[tuple[str, str], float]) -> Path:
    rows = [
        dict(setting="b1", variant=variant, metric=metric, median=median, samples=[median],
             higher_is_better=metric == "tokens/s", baseline="plain", extra={})
        for (variant, metric), median in medians.items()
    ]
    path.write_text(json.dumps({"benchmark": benchmark, "rows": rows}))
    return path


def run(tmp_path: Path, old: dict, new: dict, capsys) -> tuple[int, dict[tuple[str, str], str]]:
    status = compare.main([str(write_result(tmp_path / "old.json", "decode", old)), str(write_result(tmp_path / "new.json", "decode", new))])
    verdicts = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] == "b1":
            verdicts[cells[1], cells[2]] = cells[8]
    return status, verdicts


def test_slower_phantom_is_worse_both_ways_and_drift_of_both_only_absolutely(tmp_path, capsys) -> None:
    old = {("plain", "tokens/s"): 10.0, ("phantom", "tokens/s"): 9.5, ("phantom", "prefill s"): 2.0}
    status, verdicts = run(tmp_path, old, {**old, ("phantom", "tokens/s"): 8.9, ("phantom", "prefill s"): 2.08}, capsys)
    assert status == 1
    assert verdicts == {("plain", "tokens/s"): "", ("phantom", "tokens/s"): "worse, worse vs baseline", ("phantom", "prefill s"): ""}
    # the whole machine 8% slower: both medians drop, the ratio to the baseline holds
    status, verdicts = run(tmp_path, old, {key: value * (0.92 if key[1] == "tokens/s" else 1) for key, value in old.items()}, capsys)
    assert status == 1
    assert verdicts[("phantom", "tokens/s")] == "worse" and verdicts[("plain", "tokens/s")] == "worse"
    status, verdicts = run(tmp_path, old, {**old, ("phantom", "prefill s"): 1.5}, capsys)
    assert status == 0 and set(verdicts.values()) == {""}


def test_results_of_different_benchmarks_are_refused(tmp_path) -> None:
    old = write_result(tmp_path / "old.json", "decode", {("plain", "tokens/s"): 1.0})
    new = write_result(tmp_path / "new.json", "cache", {("plain", "tokens/s"): 1.0})
    with pytest.raises(SystemExit):
        compare.main([str(old), str(new)])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a benchmark result file"):
        compare.main([str(old), str(tmp_path / "bad.json")])
