"""Compare two result files of the same benchmark (`--json` output of decode.py, cache.py, attention.py or
train.py): the rule in BENCHMARKS.md is that a change slowing `decode` by more than 5% needs a written reason.

Rows are matched by (setting, variant, metric); each matched row prints the two medians and their ratio, and
for a row with a baseline row (e.g. phantom against plain in the same setting) also its ratio to the baseline
in each file and how that changed. Judged worse by more than `--threshold` (lower tokens/s or samples/s,
higher seconds, milliseconds or MiB): "worse" for the median itself, "worse vs baseline" for the ratio to the
baseline. The second is the robust one: a run measures its variants interleaved, so machine drift cancels in
the ratio, while medians of separate runs of the same code on a shared machine move by 5-10% (BENCHMARKS.md);
an absolute "worse" alone calls for a re-run before blaming a change. Exit status 1 when any row is worse
either way, so the check can gate a script; rows present in one file only are listed, not judged.

    python benchmarks/decode.py --settings 1x1024 --repeats 9 --threads 1 --clock process --json new.json
    python benchmarks/compare.py benchmarks/results/decode-cpu.json new.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

Key = tuple[str, str, str]


def load_rows(path: Path) -> tuple[str, dict[Key, dict[str, Any]]]:
    """The benchmark name and the rows of a result file, by (setting, variant, metric)."""
    try:
        payload = json.loads(path.read_text())
        rows = {(row["setting"], row["variant"], row["metric"]): row for row in payload["rows"]}
        return payload["benchmark"], rows
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{path}: not a benchmark result file (--json output): {error}") from None


def _is_worse(ratio: float, higher_is_better: bool, threshold: float) -> bool:
    return ratio < 1 - threshold if higher_is_better else ratio > 1 + threshold


def _vs_baseline(rows: dict[Key, dict[str, Any]], key: Key) -> float | None:
    """A row's median over its baseline row's (same setting and metric), or None without one."""
    setting, variant, metric = key
    baseline = rows[key]["baseline"]
    reference = rows.get((setting, baseline, metric))
    if baseline == variant or reference is None or not reference["median"]:
        return None
    return rows[key]["median"] / reference["median"]


def compare(old: dict[Key, dict[str, Any]], new: dict[Key, dict[str, Any]], threshold: float) -> tuple[list[str], int]:
    """Markdown lines of the comparison and the number of rows worse by more than `threshold`."""
    lines = [
        "| setting | variant | metric | old | new | new / old | vs baseline, old | new | |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    worse = 0
    for key in [key for key in new if key in old]:
        before, after = old[key]["median"], new[key]["median"]
        higher_is_better = new[key]["higher_is_better"]
        ratio = after / before if before else float("inf")
        verdicts = ["worse"] if _is_worse(ratio, higher_is_better, threshold) else []
        relative_old, relative_new = _vs_baseline(old, key), _vs_baseline(new, key)
        relative = ["", ""]
        if relative_old is not None and relative_new is not None:
            relative = [f"{relative_old:.3f}", f"{relative_new:.3f}"]
            if _is_worse(relative_new / relative_old, higher_is_better, threshold):
                verdicts.append("worse vs baseline")
        worse += bool(verdicts)
        lines.append(
            f"| {' | '.join(key)} | {before:.4g} | {after:.4g} | {ratio:.3f} | {' | '.join(relative)} | {', '.join(verdicts)} |"
        )
    for label, only in (("old", old.keys() - new.keys()), ("new", new.keys() - old.keys())):
        for key in sorted(only):
            lines.append(f"| {' | '.join(key)} | | | | | | only in the {label} file |")
    return lines, worse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="result file of the reference run")
    parser.add_argument("new", type=Path, help="result file of the run to check")
    parser.add_argument("--threshold", type=float, default=0.05, help="relative change that counts as worse (default 0.05)")
    args = parser.parse_args(argv)
    old_name, old = load_rows(args.old)
    new_name, new = load_rows(args.new)
    if old_name != new_name:
        parser.error(f"{args.old} is a {old_name!r} result and {args.new} a {new_name!r} one")
    lines, worse = compare(old, new, args.threshold)
    print(f"### {new_name}: {args.new} vs {args.old}\n")
    print("\n".join(lines))
    print(f"\n{worse} row(s) worse by more than {args.threshold:.0%}")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
