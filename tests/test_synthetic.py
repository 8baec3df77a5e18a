"""The synthetic shapes task: answers are read back from the pixels, rejected answers are wrong but plausible."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from phantom_hf.synthetic import (
    COLORS,
    DEFAULT_KINDS,
    POSITIONS,
    QUESTION_KINDS,
    SHAPES,
    Scene,
    SceneObject,
    generate_examples,
    generate_splits,
    split_words,
    to_dataset,
    vocabulary,
)


def read_scene(image: Image.Image) -> dict[str, tuple[str, str]]:
    """Recover {position: (colour, shape)} from the pixels alone.

    Colour: the only non-white RGB value in the cell. Shape: how much of its bounding box the shape
    fills (square 1.0, circle ~0.785, triangle ~0.5).
    """
    pixels = np.asarray(image.convert("RGB"))
    half = pixels.shape[0] // 2
    by_rgb = {rgb: name for name, rgb in COLORS.items()}
    scene = {}
    for position, (row, column) in POSITIONS.items():
        cell = pixels[row * half : (row + 1) * half, column * half : (column + 1) * half]
        mask = (cell != 255).any(axis=-1)
        if not mask.any():
            continue
        colours = {tuple(int(v) for v in rgb) for rgb in cell[mask]}
        assert len(colours) == 1, f"anti-aliased or mixed colours in {position}: {colours}"
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        scene[position] = (by_rgb[colours.pop()], shape)
    return scene


def answer_from_pixels(question: str, scene: dict[str, tuple[str, str]]) -> str:
    """Answer a generated question using only the scene read from the pixels."""
    if match := re.fullmatch(r"What (color|shape) is the object at the (.+)\?", question):
        colour, shape = scene[match.group(2)]
        return colour if match.group(1) == "color" else shape
    if question == "How many objects are there?":
        return str(len(scene))
    if match := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(sum(colour == match.group(1) for colour, _ in scene.values()))
    if match := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (position,) = [pos for pos, look in scene.items() if look == (match.group(1), match.group(2))]
        return position
    raise AssertionError(f"unexpected question {question!r}")


ANSWER_TYPES = {
    "color": set(COLORS),
    "shape": set(SHAPES),
    "count": {"1", "2", "3", "4"},
    "color_count": {"0", "1", "2", "3", "4"},
    "position": set(POSITIONS),
}


@pytest.mark.parametrize("image_size", [28, 56])
def test_answers_match_the_pixels_and_rejected_answers_are_wrong_but_plausible(image_size: int) -> None:
    examples = generate_examples(150, seed=7, image_size=image_size, kinds=QUESTION_KINDS)
    assert len(examples) == 150 * len(QUESTION_KINDS)
    ambiguous_checked = 0
    for example in examples:
        assert example.image.size == (image_size, image_size)
        scene = read_scene(example.image)
        assert answer_from_pixels(example.question, scene) == example.chosen, example.description
        assert example.rejected != example.chosen
        assert example.chosen in ANSWER_TYPES[example.kind] and example.rejected in ANSWER_TYPES[example.kind]
        # Ambiguous: when the scene holds another value of the same type, the rejected answer is one of them.
        present = {
            "color": {colour for colour, _ in scene.values()},
            "shape": {shape for _, shape in scene.values()},
            "position": set(scene),
        }.get(example.kind)
        if present is not None and present - {example.chosen}:
            assert example.rejected in present
            ambiguous_checked += 1
        if example.kind in ("count", "color_count"):
            assert abs(int(example.rejected) - int(example.chosen)) == 1
    assert ambiguous_checked > 200


def test_every_answer_value_occurs_so_no_constant_answer_wins() -> None:
    examples = generate_examples(200, seed=0, kinds=QUESTION_KINDS)
    for kind, values in ANSWER_TYPES.items():
        seen = {example.chosen for example in examples if example.kind == kind}
        expected = values - {"4"}  # default scenes hold at most 3 objects
        assert seen == expected, kind
    # No answer value dominates a kind: the most common one is under 60% of its questions.
    for kind in DEFAULT_KINDS:
        answers = [example.chosen for example in examples if example.kind == kind]
        assert max(answers.count(value) for value in set(answers)) / len(answers) < 0.6


def test_deterministic_per_seed() -> None:
    first = generate_examples(20, seed=3, image_size=32)
    again = generate_examples(20, seed=3, image_size=32)
    other = generate_examples(20, seed=4, image_size=32)
    assert [ex.to_row()["prompt"] for ex in first] == [ex.to_row()["prompt"] for ex in again]
    assert [(ex.chosen, ex.rejected, ex.description) for ex in first] == [
        (ex.chosen, ex.rejected, ex.description) for ex in again
    ]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, again))
    assert [ex.description for ex in first] != [ex.description for ex in other]


def test_held_out_scenes_never_occur_in_training() -> None:
    train, test = generate_splits(300, 60, seed=1, image_size=28)
    train_scenes = {example.scene.key for example in train}
    assert len(test) == 60 * len(DEFAULT_KINDS)
    assert not train_scenes & {example.scene.key for example in test}


def test_rows_are_phantom_triples_and_the_vocabulary_covers_them() -> None:
    examples = generate_examples(100, seed=2, kinds=QUESTION_KINDS)
    words = set(vocabulary())
    for example in examples:
        row = example.to_row()
        assert row["prompt"] == "<image>\n" + row["question"]
        assert row["prompt"].count("<image>") == len(row["images"]) == 1
        text = " ".join([row["question"], row["chosen"], row["rejected"]])
        assert set(split_words(text)) <= words
    assert "<image>" not in words
    # Restricting the kinds restricts the words.
    assert "Where" not in vocabulary(["color", "count"])


def test_tokenizer_built_from_the_vocabulary_has_no_unknown_words() -> None:
    from phantom_hf.tokenization import build_tokenizer

    tokenizer = build_tokenizer(vocabulary())
    for example in generate_examples(30, seed=5):
        # `<image>` itself is expanded by the processor before tokenization.
        text = " ".join([example.question, example.chosen, example.rejected])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids


def test_to_dataset_keeps_images_and_columns() -> None:
    import datasets

    examples = generate_examples(3, seed=0, image_size=28)
    dataset = to_dataset(examples)
    assert isinstance(dataset.features["images"], datasets.List)
    assert isinstance(dataset.features["images"].feature, datasets.Image)
    assert dataset.column_names[:4] == ["images", "prompt", "chosen", "rejected"]
    for row, example in zip(dataset, examples):
        assert row["chosen"] == example.chosen and row["rejected"] == example.rejected
        assert np.array_equal(np.asarray(row["images"][0].convert("RGB")), np.asarray(example.image))
    # PNG bytes round-trip exactly (lossless), so the pixels the model sees are the ones drawn.
    buffer = io.BytesIO()
    examples[0].image.save(buffer, format="PNG")
    assert read_scene(Image.open(buffer)) == read_scene(examples[0].image)


def test_bad_input_is_refused_with_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown question kinds"):
        generate_examples(1, kinds=["colour"])
    with pytest.raises(ValueError, match="non-empty list"):
        generate_examples(1, kinds="color")
    with pytest.raises(ValueError, match="image_size"):
        generate_examples(1, image_size=4)
    with pytest.raises(ValueError, match="max_objects"):
        generate_examples(1, max_objects=5)
    with pytest.raises(ValueError, match="share a cell"):
        Scene((SceneObject("red", "circle", "top left"), SceneObject("blue", "square", "top left")))
    with pytest.raises(ValueError, match="unknown colour"):
        Scene((SceneObject("purple", "circle", "top left"),))
