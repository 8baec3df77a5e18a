"""Triples whose images are empty, truncated or not images, or whose prompt lacks `<image>`, are reported by row and
reason before training (not at the first batch that holds them); JSON-lines files with non-UTF-8 text or mixed
column types are refused naming the file and line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Image, List, disable_progress_bars
from PIL import Image as PILImage

from phantom_hf.data import InvalidTriplesError, load_triples_jsonl, validate_triples

disable_progress_bars()


def encoded(format: str, seed: int = 0) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def test_images_are_opened_and_bad_ones_reported_by_row_and_reason(tmp_path: Path) -> None:
    files = {
        "ok.png": encoded("PNG"),
        "ok.jpg": encoded("JPEG"),
        "ok.gif": encoded("GIF"),
        "empty.png": b"",
        "truncated.png": encoded("PNG")[:300],
        "truncated.jpg": encoded("JPEG")[:-200],
        "text.png": b"these are not pixels",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    rows = [{"images": [str(tmp_path / name)], "prompt": "<image> q", "chosen": "a", "rejected": "b"} for name in files]
    rows.append({"images": [str(tmp_path / "ok.png")], "prompt": "a question without the marker", "chosen": "a", "rejected": "b"})
    rows.append({"images": [{"bytes": encoded("PNG")[:300], "path": None}], "prompt": "<image> q", "chosen": "a", "rejected": "b"})
    dataset = Dataset.from_list(rows[:-1])
    with pytest.raises(InvalidTriplesError) as error:
        validate_triples(dataset, on_invalid="raise")
    reasons = {problem.index: problem.reason for problem in error.value.problems}
    assert sorted(reasons) == [3, 4, 5, 6, 7]  # the PNG, JPEG and GIF files are fine
    assert reasons[3] == f"image 0: image file {str(tmp_path / 'empty.png')!r} is empty"
    assert reasons[4].startswith(f"image 0: image file {str(tmp_path / 'truncated.png')!r} is truncated or corrupt")
    assert reasons[5] == f"image 0: image file {str(tmp_path / 'truncated.jpg')!r} is truncated (a JPEG without its end-of-image marker)"
    assert reasons[6] == f"image 0: image file {str(tmp_path / 'text.png')!r} is not an image Pillow can read"
    assert reasons[7] == "prompt has 0 <image> placeholder(s) but the row has 1 image(s)"
    # bytes of a datasets Image column are checked the same way
    in_memory = Dataset.from_list([rows[-1]]).cast_column("images", List(Image(decode=False)))
    with pytest.raises(InvalidTriplesError, match=r"row 0: image 0: the image bytes is truncated or corrupt"):
        validate_triples(in_memory, on_invalid="raise")


def test_non_utf8_and_mixed_column_types_name_the_file_and_line(tmp_path: Path) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b", "kind": "colour"}
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(good) + "\n").encode() + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}:2 is not UTF-8 text \(invalid continuation byte at byte 15 of the line\)"):
        load_triples_jsonl(path)
    path = tmp_path / "mixed.jsonl"
    lines = [good, good, {**good, "kind": 3}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=rf"{path}:3: column 'kind' holds a number here but a string on line 1"):
        load_triples_jsonl(path)
    path.write_text("".join(json.dumps(line) + "\n" for line in (good, {**good, "chosen": 7})))
    with pytest.raises(ValueError, match=rf"{path}:2: chosen must be a string, got number"):
        load_triples_jsonl(path)
    path.write_text(json.dumps({**good, "images": ["a.png", 5]}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:1: images\[1\] must be a path, got int"):
        load_triples_jsonl(path)
    # ints and floats mix in one numeric column, as Arrow does
    path.write_text("".join(json.dumps({**good, "score": score}) + "\n" for score in (1, 0.5)))
    assert load_triples_jsonl(path)["score"] == [1.0, 0.5]
