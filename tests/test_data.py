"""Phantom triples: loading from a Dataset with an Image column and from JSON lines, and the report of bad rows."""

from __future__ import annotations

import json
import logging

import pytest
from datasets import Dataset, Image, List, disable_progress_bars
from PIL import Image as PILImage

from phantom_hf.data import (
    InvalidTriplesError,
    TripleProblem,
    load_phantom_triples,
    load_triples_jsonl,
    triple_problems,
    validate_triples,
)

disable_progress_bars()


def _write_image(path, color=(200, 10, 10)) -> str:
    PILImage.new("RGB", (8, 8), color).save(path)
    return str(path)


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_jsonl_with_relative_image_paths_loads_as_image_features(tmp_path):
    (tmp_path / "img").mkdir()
    _write_image(tmp_path / "img" / "a.png", (1, 2, 3))
    _jsonl(
        tmp_path / "triples.jsonl",
        [
            {"images": ["img/a.png"], "prompt": "<image> colour?", "chosen": "red", "rejected": "blue"},
            {"prompt": "text only", "chosen": "yes", "rejected": "no"},
        ],
    )
    dataset = load_phantom_triples(tmp_path / "triples.jsonl")
    assert len(dataset) == 2
    assert isinstance(dataset.features["images"], List) and isinstance(dataset.features["images"].feature, Image)
    decoded = dataset.cast_column("images", List(Image()))
    assert decoded[0]["images"][0].getpixel((0, 0)) == (1, 2, 3)
    assert decoded[1]["images"] == []


def test_jsonl_bad_rows_are_reported_by_index_and_reason_then_skipped(tmp_path, caplog):
    _write_image(tmp_path / "ok.png")
    rows = [
        {"images": ["ok.png"], "prompt": "<image> q", "chosen": "a", "rejected": "b"},
        {"images": ["ok.png"], "prompt": "<image> q", "chosen": "same", "rejected": "same"},
        {"images": ["gone.png"], "prompt": "<image> q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "", "rejected": "b"},
        {"images": ["ok.png"], "prompt": "<image> <image> q", "chosen": "a", "rejected": "b"},
    ]
    _jsonl(tmp_path / "t.jsonl", rows)
    raw = load_triples_jsonl(tmp_path / "t.jsonl")
    with caplog.at_level(logging.WARNING, logger="phantom_hf.data"):
        valid, problems = validate_triples(raw)
    assert len(valid) == 1 and valid[0]["chosen"] == "a"
    assert [problem.index for problem in problems] == [1, 2, 3, 4]
    assert problems[0].reason == "chosen equals rejected"
    assert problems[1].reason.startswith("image 0: missing image file") and "gone.png" in problems[1].reason
    assert problems[2].reason == "empty chosen answer"
    assert "2 <image> placeholder(s) but the row has 1 image(s)" in problems[3].reason
    assert "skipping 4 of 5 Phantom triples" in caplog.text and "row 2: image 0: missing image file" in caplog.text

    with pytest.raises(InvalidTriplesError, match="4 invalid Phantom triple") as error:
        validate_triples(raw, on_invalid="raise")
    assert error.value.problems == problems and isinstance(error.value, ValueError)


def test_dataset_with_image_feature_column(tmp_path):
    image = PILImage.new("RGB", (8, 8), (0, 255, 0))
    path = _write_image(tmp_path / "p.png")
    dataset = Dataset.from_list(
        [
            {"images": [image], "prompt": "<image> q", "chosen": "a", "rejected": "b"},
            {"images": [path], "prompt": "<image> q", "chosen": "whitespace  ", "rejected": "whitespace"},
            {"images": [], "prompt": "q", "chosen": "x", "rejected": "y"},
        ]
    ).cast_column("images", List(Image()))
    valid, problems = validate_triples(dataset)
    assert problems == [TripleProblem(1, "chosen equals rejected")]
    assert len(valid) == 2 and valid[0]["images"][0].getpixel((0, 0)) == (0, 255, 0)  # still decodes as before


def test_path_images_that_vanish_after_building_the_dataset_are_caught(tmp_path):
    path = tmp_path / "later.png"
    _write_image(path)
    dataset = Dataset.from_list([{"images": [str(path)], "prompt": "<image> q", "chosen": "a", "rejected": "b"}])
    dataset = dataset.cast_column("images", List(Image()))
    path.unlink()
    with pytest.raises(ValueError, match=r"row 0: image 0: missing image file"):
        load_phantom_triples(dataset, on_invalid="raise")


def test_clear_errors_for_malformed_input(tmp_path):
    with pytest.raises(ValueError, match="missing \\['rejected'\\]"):
        validate_triples(Dataset.from_list([{"prompt": "q", "chosen": "a"}]))
    with pytest.raises(TypeError, match="datasets.Dataset"):
        validate_triples([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="on_invalid"):
        validate_triples(Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}]), on_invalid="ignore")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{not json}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        load_triples_jsonl(tmp_path / "bad.jsonl")
    assert triple_problems({"prompt": None, "chosen": "a", "rejected": "b"}) == ["prompt must be a string, got NoneType"]
