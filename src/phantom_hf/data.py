"""Phantom triples for Phantom Optimization (paper Sec. 3, Eq. 4).

A triple is one row with the columns `images` (a list of images, possibly empty or missing for a text-only
row), `prompt` (the question, with `<image>` where each image goes), `chosen` (the correct answer) and
`rejected` (an incorrect-and-ambiguous answer). Rows come from a `datasets.Dataset` (an `Image` feature
column, image paths, or PIL images) or from a JSON-lines file with image paths.

A row that cannot teach the preference — chosen equal to rejected, an empty answer, an image file that is
missing, empty, truncated or not an image (each opened cheaply: header and checksums, not decoded), a prompt
whose `<image>` count differs from its images — is reported with its index and reason, then skipped (with a
count) or refused, by choice; it is never silently trained on, nor found hours into a run.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset, Image, List
from PIL import Image as PILImage

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


def _encoded_image_problem(data: bytes, name: str) -> str | None:
    """A reason when `data` is not a whole image, found cheaply: the header is read and checked (PNG chunk checksums
    with Pillow's `verify`, the end-of-image marker of a JPEG); images of other formats are decoded."""
    if not data:
        return f"{name} is empty"
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image_format, size = image.format, image.size
            if image_format in ("PNG", "JPEG"):
                image.verify()
            else:
                image.load()
    except PILImage.UnidentifiedImageError:
        return f"{name} is not an image Pillow can read"
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as error:
        return f"{name} is truncated or corrupt ({error})"
    if min(size) == 0:
        return f"{name} has zero size ({size[0]}x{size[1]} pixels)"
    if image_format == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return f"{name} is truncated (a JPEG without its end-of-image marker)"
    return None


def _image_ref_problem(ref: Any) -> str | None:
    """A reason when an image reference is not a readable image (a missing, empty, truncated or non-image file or
    bytes), else None. In-memory PIL images are taken as they are."""
    if ref is None:
        return "image is None"
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return _encoded_image_problem(ref["bytes"], "the image bytes")
        path = ref.get("path")
    elif isinstance(ref, (str, os.PathLike)):
        path = ref
    else:
        return None  # an in-memory image (PIL)
    if not path:
        return "image has neither bytes nor a path"
    if not Path(path).is_file():
        return f"missing image file {str(path)!r}"
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return f"image file {str(path)!r} cannot be read ({error.strerror or error})"
    return _encoded_image_problem(data, f"image file {str(path)!r}")


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
        if placeholders != len(images):
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


def _json_type(value: Any) -> str:
    """The JSON type of a value as Arrow needs it to be the same down a column (int and float mix)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def load_triples_jsonl(path: str | Path, image_root: str | Path | None = None) -> Dataset:
    """Read a JSON-lines file of triples into a `Dataset` whose `images` column is a list of `Image` features.

    Each line is an object with `prompt`, `chosen`, `rejected` and optionally `images` (a list of paths, or
    a single path). Relative paths are resolved against `image_root` (default: the file's folder). Lines that are
    not UTF-8 or JSON objects, answers or image paths that are not strings, and a column whose values change type
    from line to line are errors naming the file and line. Rows are not validated here: pass the result to
    `validate_triples` (the trainer does).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows = []
    column_types: dict[str, tuple[str, int]] = {}
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where} is not UTF-8 text ({error.reason} at byte {error.start} of the line)") from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error.msg}") from error
            if not isinstance(record, dict):
                raise ValueError(f"{where} must be a JSON object, got {type(record).__name__}")
            images = record.get("images")
            if images is None and "image" in record:
                images = record["image"]
            if isinstance(images, (str, os.PathLike)):
                images = [images]
            if images is not None and not isinstance(images, list):
                raise ValueError(f"{where}: images must be a list of paths, got {type(images).__name__}")
            for position, image in enumerate(images or []):
                if image is not None and not isinstance(image, str):
                    raise ValueError(f"{where}: images[{position}] must be a path, got {type(image).__name__}")
            for column in TRIPLE_COLUMNS:
                if column in record and not isinstance(record[column], str):
                    raise ValueError(f"{where}: {column} must be a string, got {_json_type(record[column])}")
            record["images"] = [str(root / image) if image is not None else None for image in images or []]
            record.pop("image", None)
            for column, value in record.items():
                if value is None or column == "images":
                    continue
                kind = _json_type(value)
                first_kind, first_line = column_types.setdefault(column, (kind, line_number))
                if kind != first_kind:
                    raise ValueError(
                        f"{where}: column {column!r} holds a {kind} here but a {first_kind} on line {first_line}; "
                        "each column must hold one type"
                    )
            rows.append(record)
    if not rows:
        raise ValueError(f"{path} holds no triples")
    dataset = Dataset.from_list(rows)
    return dataset.cast_column("images", List(Image(decode=False)))


def load_triples(source: str | Path, split: str | None = None, image_root: str | Path | None = None) -> Dataset:
    """Triples from a JSON-lines file (`load_triples_jsonl`), a folder written by `Dataset.save_to_disk` (with
    `split`, default "train", when it holds a `DatasetDict`) or a Hub dataset id (its `split`, default "train")."""
    import datasets

    path = Path(source)
    if path.is_file():
        return load_triples_jsonl(path, image_root=image_root)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            name = split or "train"
            if name not in loaded:
                raise ValueError(f"{str(source)!r} has splits {sorted(loaded)}, not {name!r}: pass --dataset-split")
            loaded = loaded[name]
        return loaded
    return datasets.load_dataset(str(source), split=split or "train")


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
    "load_triples",
    "load_triples_jsonl",
    "triple_problems",
    "undecoded_images",
    "validate_triples",
]
