"""Phantom triples for Phantom Optimization (PHANTOM_SPEC section 7).

A triple is one row with the columns `images` (a list of images, possibly empty or missing for a text-only
row), `prompt` (the question, with `<image>` where each image goes), `chosen` (the correct answer) and
`rejected` (an incorrect-and-ambiguous answer). Rows come from a `datasets.Dataset` (an `Image` feature
column, image paths, or PIL images) or from a JSON-lines file with image paths.

A row that cannot teach the preference — chosen equal to rejected, an empty answer, a missing image file,
a prompt whose `<image>` count differs from its images — is reported with its index and reason, then
skipped (with a count) or refused, by choice; it is never silently trained on.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset, Image, List

from .modeling.processing_phantom import IMAGE_MARKER

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = IMAGE_MARKER
TRIPLE_COLUMNS = ("prompt", "chosen", "rejected")
InvalidPolicy = Literal["skip", "raise"]


@dataclass(frozen=True)
class TripleProblem:
    """Why row `index` of a triple dataset cannot be trained on."""

    index: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}: {self.reason}"


class InvalidTriplesError(ValueError):
    """Raised by `validate_triples(..., on_invalid="raise")`; `problems` lists every bad row."""

    def __init__(self, problems: list[TripleProblem]) -> None:
        self.problems = problems
        shown = "; ".join(str(problem) for problem in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} invalid Phantom triple(s): {shown}{more}")


def _image_ref_problem(ref: Any) -> str | None:
    """A reason when an image reference points at no readable file, else None."""
    if ref is None:
        return "image is None"
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return None
        path = ref.get("path")
    elif isinstance(ref, (str, os.PathLike)):
        path = ref
    else:
        return None  # an in-memory image (PIL)
    if not path:
        return "image has neither bytes nor a path"
    if not Path(path).is_file():
        return f"missing image file {str(path)!r}"
    return None


def triple_problems(row: dict[str, Any]) -> list[str]:
    """Every reason why one triple row cannot be trained on (empty list: the row is fine)."""
    reasons = []
    for column in TRIPLE_COLUMNS:
        value = row.get(column)
        if not isinstance(value, str):
            reasons.append(f"{column} must be a string, got {type(value).__name__}")
        elif column != "prompt" and not value.strip():
            reasons.append(f"empty {column} answer")
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() and chosen.strip() == rejected.strip():
        reasons.append("chosen equals rejected")
    images = row.get("images") or []
    for position, ref in enumerate(images):
        problem = _image_ref_problem(ref)
        if problem is not None:
            reasons.append(f"image {position}: {problem}")
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        placeholders = prompt.count(IMAGE_PLACEHOLDER)
        if placeholders and placeholders != len(images):
            reasons.append(f"prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the row has {len(images)} image(s)")
    return reasons


def undecoded_images(dataset: Dataset) -> Dataset:
    """The dataset with its `images` column undecoded (paths/bytes): validation then opens no image, and
    dataset maps pass images through without re-encoding them (the collator opens them when batching)."""
    feature = dataset.features.get("images")
    if isinstance(feature, List) and isinstance(feature.feature, Image) and feature.feature.decode:
        return dataset.cast_column("images", List(Image(decode=False)))
    return dataset


def validate_triples(
    dataset: Dataset, on_invalid: InvalidPolicy = "skip"
) -> tuple[Dataset, list[TripleProblem]]:
    """Check every row of a triple dataset; return the good rows and the problems found.

    `on_invalid="skip"` drops the bad rows and logs how many (with their indices and reasons);
    `on_invalid="raise"` raises `InvalidTriplesError` listing them. Row indices refer to `dataset`.
    """
    if on_invalid not in ("skip", "raise"):
        raise ValueError(f"on_invalid must be 'skip' or 'raise', got {on_invalid!r}")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"a Phantom triple dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    missing = [column for column in TRIPLE_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"a Phantom triple dataset needs the columns {TRIPLE_COLUMNS} (and optionally 'images'); missing {missing}"
        )
    raw = undecoded_images(dataset)
    columns = [column for column in ("images", *TRIPLE_COLUMNS) if column in raw.column_names]
    problems = []
    for index, row in enumerate(raw.select_columns(columns)):
        problems.extend(TripleProblem(index, reason) for reason in triple_problems(row))
    if not problems:
        return dataset, []
    if on_invalid == "raise":
        raise InvalidTriplesError(problems)
    bad_rows = sorted({problem.index for problem in problems})
    logger.warning(
        "skipping %d of %d Phantom triples: %s%s",
        len(bad_rows),
        len(dataset),
        "; ".join(str(problem) for problem in problems[:20]),
        " ..." if len(problems) > 20 else "",
    )
    bad = set(bad_rows)
    return dataset.select([index for index in range(len(dataset)) if index not in bad]), problems


def load_triples_jsonl(path: str | Path, image_root: str | Path | None = None) -> Dataset:
    """Read a JSON-lines file of triples into a `Dataset` whose `images` column is a list of `Image` features.

    Each line is an object with `prompt`, `chosen`, `rejected` and optionally `images` (a list of paths, or
    a single path). Relative paths are resolved against `image_root` (default: the file's folder). Rows are
    not validated here: pass the result to `validate_triples` (the trainer does).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {error.msg}") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number} must be a JSON object, got {type(record).__name__}")
            images = record.get("images")
            if images is None and "image" in record:
                images = record["image"]
            if isinstance(images, (str, os.PathLike)):
                images = [images]
            if images is not None and not isinstance(images, list):
                raise ValueError(f"{path}:{line_number}: images must be a list of paths, got {type(images).__name__}")
            record["images"] = [str(root / image) if image is not None else None for image in images or []]
            record.pop("image", None)
            rows.append(record)
    if not rows:
        raise ValueError(f"{path} holds no triples")
    dataset = Dataset.from_list(rows)
    return dataset.cast_column("images", List(Image(decode=False)))


def load_phantom_triples(
    source: str | Path | Dataset, image_root: str | Path | None = None, on_invalid: InvalidPolicy = "skip"
) -> Dataset:
    """A validated triple dataset from a `Dataset` or a JSON-lines path (see `validate_triples`)."""
    dataset = source if isinstance(source, Dataset) else load_triples_jsonl(source, image_root=image_root)
    valid, _ = validate_triples(dataset, on_invalid=on_invalid)
    return valid


__all__ = [
    "IMAGE_PLACEHOLDER",
    "InvalidTriplesError",
    "TripleProblem",
    "load_phantom_triples",
    "load_triples_jsonl",
    "triple_problems",
    "undecoded_images",
    "validate_triples",
]
