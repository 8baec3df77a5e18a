"""A synthetic visual question-answering task for the offline demo and tests.

Each image is a square canvas cut into a 2x2 grid; 1-3 of its cells hold a filled shape (circle, square
or triangle) in one of a few colours, drawn with Pillow without anti-aliasing so that tests can read the
scene back from the pixels. Questions ask about colour, shape, count and position. Every question comes
with the correct answer and an incorrect-and-ambiguous one (paper Sec. 3, the triples of Eq. 4): same answer type and
plausible in the image — a colour, shape or position that is present elsewhere in the scene, or a count
off by one. Everything is deterministic given the seed.

Rows follow the Phantom triple format: `images` (a list with one image), `prompt` (the question, after
`<image>`), `chosen`, `rejected`; plus `question`, `kind` and `description` (a human description of the
image) for evaluation and display.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from PIL import Image, ImageDraw

from .modeling.processing_phantom import IMAGE_MARKER

IMAGE_PLACEHOLDER = IMAGE_MARKER
BACKGROUND = (255, 255, 255)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
# Cell (row, column) of each position in the 2x2 grid.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top right": (0, 1),
    "bottom left": (1, 0),
    "bottom right": (1, 1),
}
MAX_OBJECTS = len(POSITIONS)
# Question templates per kind; the fields are filled from the scene.
TEMPLATES: dict[str, str] = {
    "color": "What color is the object at the {position}?",
    "shape": "What shape is the object at the {position}?",
    "count": "How many objects are there?",
    "color_count": "How many {color} objects are there?",
    "position": "Where is the {color} {shape}?",
}
QUESTION_KINDS = tuple(TEMPLATES)
DEFAULT_KINDS = ("color", "shape", "count", "position")
# Matches what the `tokenizers` `Whitespace` pre-tokenizer splits a text into.
_WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene, and where and how large it is drawn."""

    color: str
    shape: str
    position: str
    scale: float = 0.7
    offset: tuple[float, float] = (0.0, 0.0)

    def describe(self) -> str:
        return f"a {self.color} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class Scene:
    """A 2x2-grid scene: at most one object per cell."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        for item in self.objects:
            if item.color not in COLORS or item.shape not in SHAPES or item.position not in POSITIONS:
                raise ValueError(f"unknown colour, shape or position in {item}")
        positions = [item.position for item in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a cell: {positions}")

    @property
    def key(self) -> tuple[tuple[str, str, str], ...]:
        """What the questions can see (drawing jitter left out): used to keep held-out scenes unseen."""
        return tuple(sorted((item.position, item.color, item.shape) for item in self.objects))

    def describe(self) -> str:
        """A human description, e.g. "2 objects: a red circle at the top left, a blue square at the bottom right"."""
        ordered = sorted(self.objects, key=lambda item: list(POSITIONS).index(item.position))
        count = len(ordered)
        noun = "object" if count == 1 else "objects"
        return f"{count} {noun}: " + ", ".join(item.describe() for item in ordered)

    def render(self, image_size: int) -> Image.Image:
        """Draw the scene on a white `image_size` x `image_size` RGB canvas (no anti-aliasing)."""
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        image = Image.new("RGB", (image_size, image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        cell = image_size / 2
        for item in self.objects:
            row, column = POSITIONS[item.position]
            side = max(3.0, item.scale * cell)
            room = (cell - side) / 2
            left = column * cell + room * (1 + item.offset[0])
            top = row * cell + room * (1 + item.offset[1])
            # Integer corners keep every shape inside its own cell.
            box = (round(left), round(top), round(left + side) - 1, round(top + side) - 1)
            fill = COLORS[item.color]
            if item.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif item.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                x0, y0, x1, y1 = box
                draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        return image


@dataclass(frozen=True)
class SyntheticExample:
    """One question about one image, with its correct and its incorrect-but-ambiguous answer."""

    image: Image.Image
    scene: Scene
    kind: str
    question: str
    chosen: str
    rejected: str

    @property
    def prompt(self) -> str:
        return f"{IMAGE_PLACEHOLDER}\n{self.question}"

    @property
    def description(self) -> str:
        return self.scene.describe()

    def to_row(self) -> dict[str, Any]:
        """The Phantom triple (`images`, `prompt`, `chosen`, `rejected`) plus `question`, `kind`, `description`."""
        return {
            "images": [self.image],
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "question": self.question,
            "kind": self.kind,
            "description": self.description,
        }


def random_scene(rng: random.Random, max_objects: int = 3, jitter: float = 0.15) -> Scene:
    """A scene of 1..`max_objects` objects in distinct cells, no two of the same colour and shape.

    `jitter` varies the size and placement of each shape inside its cell (0: every shape centred, same size).
    """
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects!r}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be in [0, 1], got {jitter!r}")
    count = rng.randint(1, max_objects)
    positions = rng.sample(list(POSITIONS), count)
    # Distinct (colour, shape) pairs, so that "Where is the red circle?" always has one answer.
    looks = rng.sample([(color, shape) for color in COLORS for shape in SHAPES], count)
    objects = []
    for position, (color, shape) in zip(positions, looks):
        scale = min(0.95, 0.7 * (1 + rng.uniform(-jitter, jitter)))
        offset = (rng.uniform(-jitter, jitter) * 4, rng.uniform(-jitter, jitter) * 4)
        offset = (max(-1.0, min(1.0, offset[0])), max(-1.0, min(1.0, offset[1])))
        objects.append(SceneObject(color, shape, position, scale, offset))
    return Scene(tuple(objects))


def _ambiguous(rng: random.Random, truth: str, in_scene: Iterable[str], universe: Sequence[str]) -> str:
    """A wrong answer of the same type: one present elsewhere in the scene if any, else any other value."""
    present = sorted({value for value in in_scene if value != truth})
    if present:
        return rng.choice(present)
    return rng.choice([value for value in universe if value != truth])


def _near_count(rng: random.Random, truth: int, low: int, high: int) -> str:
    return str(rng.choice([value for value in (truth - 1, truth + 1) if low <= value <= high]))


def ask(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str, str]:
    """One question of `kind` about `scene`: (question, correct answer, incorrect-and-ambiguous answer)."""
    objects = scene.objects
    if kind in ("color", "shape"):
        target = rng.choice(objects)
        question = TEMPLATES[kind].format(position=target.position)
        if kind == "color":
            rejected = _ambiguous(rng, target.color, (item.color for item in objects), list(COLORS))
            return question, target.color, rejected
        return question, target.shape, _ambiguous(rng, target.shape, (item.shape for item in objects), SHAPES)
    if kind == "count":
        return TEMPLATES[kind], str(len(objects)), _near_count(rng, len(objects), 1, MAX_OBJECTS)
    if kind == "color_count":
        color = rng.choice(list(COLORS))
        truth = sum(item.color == color for item in objects)
        return TEMPLATES[kind].format(color=color), str(truth), _near_count(rng, truth, 0, MAX_OBJECTS)
    if kind == "position":
        # Only objects whose colour and shape together name them uniquely can be asked about.
        combos = [(item.color, item.shape) for item in objects]
        unique = [item for item in objects if combos.count((item.color, item.shape)) == 1]
        if not unique:
            raise ValueError(f"no object of {scene.describe()!r} is named uniquely by its colour and shape")
        target = rng.choice(unique)
        question = TEMPLATES[kind].format(color=target.color, shape=target.shape)
        rejected = _ambiguous(rng, target.position, (item.position for item in objects), list(POSITIONS))
        return question, target.position, rejected
    raise ValueError(f"unknown question kind {kind!r}; choose from {QUESTION_KINDS}")


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str) or not kinds:
        raise ValueError(f"kinds must be a non-empty list of question kinds from {QUESTION_KINDS}, got {kinds!r}")
    unknown = [kind for kind in kinds if kind not in TEMPLATES]
    if unknown:
        raise ValueError(f"unknown question kinds {unknown}; choose from {QUESTION_KINDS}")
    return tuple(kinds)


def generate_examples(
    num_images: int,
    seed: int = 0,
    image_size: int = 56,
    kinds: Sequence[str] = DEFAULT_KINDS,
    max_objects: int = 3,
    jitter: float = 0.15,
    exclude_scenes: Iterable[tuple] = (),
) -> list[SyntheticExample]:
    """`num_images` random scenes, each with one question of every kind in `kinds` (deterministic per seed).

    Scenes whose `Scene.key` is in `exclude_scenes` are redrawn, which keeps a held-out split unseen.
    """
    if not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be an int >= 0, got {num_images!r}")
    kinds = _check_kinds(kinds)
    excluded = set(exclude_scenes)
    rng = random.Random(seed)
    examples = []
    for _ in range(num_images):
        for _attempt in range(1000):
            scene = random_scene(rng, max_objects=max_objects, jitter=jitter)
            if scene.key not in excluded:
                break
        else:
            raise ValueError("could not draw a scene outside exclude_scenes; exclude fewer scenes")
        image = scene.render(image_size)
        for kind in kinds:
            question, chosen, rejected = ask(scene, kind, rng)
            examples.append(SyntheticExample(image, scene, kind, question, chosen, rejected))
    return examples


def generate_splits(
    num_train_images: int,
    num_test_images: int,
    seed: int = 0,
    **options: Any,
) -> tuple[list[SyntheticExample], list[SyntheticExample]]:
    """Train and held-out examples; no held-out scene (colours, shapes, positions) occurs in training.

    `options` go to `generate_examples` (image_size, kinds, max_objects, jitter).
    """
    train = generate_examples(num_train_images, seed=seed, **options)
    seen = {example.scene.key for example in train}
    test = generate_examples(num_test_images, seed=seed + 1_000_003, exclude_scenes=seen, **options)
    return train, test


# The demo's images: 28 px, one 28 px tile of 7 px patches for its vision tower.
DEMO_IMAGE_SIZE = 28


@dataclass
class DemoBudget:
    """How much data (scenes drawn for training and for the held-out split) and how many optimizer steps each phase
    of `phantom-hf demo` gets; `phantom_hf.evaluation.write_synthetic_task` draws the same held-out split."""

    train_images: int
    test_images: int
    warmup_steps: int
    step1_steps: int
    step2_cell_steps: int
    step2_steps: int
    batch_size: int = 32
    learning_rate: float = 3e-4


BUDGETS = {
    "full": DemoBudget(
        train_images=6000, test_images=100, warmup_steps=100, step1_steps=200, step2_cell_steps=500, step2_steps=3000
    ),
    "quick": DemoBudget(
        train_images=400, test_images=40, warmup_steps=30, step1_steps=40, step2_cell_steps=100, step2_steps=200
    ),
}




def demo_splits(budget: str | DemoBudget, seed: int = 0) -> tuple[list[SyntheticExample], list[SyntheticExample]]:
    """The training and held-out examples of `phantom-hf demo --budget BUDGET --seed SEED` (`BUDGETS`)."""
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ValueError(f"unknown demo budget {budget!r}; choose from {sorted(BUDGETS)}")
        budget = BUDGETS[budget]
    return generate_splits(budget.train_images, budget.test_images, seed=seed, image_size=DEMO_IMAGE_SIZE)


def to_rows(examples: Iterable[SyntheticExample]) -> list[dict[str, Any]]:
    """Phantom triples as plain dicts (see `SyntheticExample.to_row`)."""
    return [example.to_row() for example in examples]


def to_dataset(examples: Iterable[SyntheticExample]) -> "datasets.Dataset":  # noqa: F821
    """A `datasets.Dataset` of Phantom triples; `images` is a list of `datasets.Image` (needs `datasets`)."""
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is an optional dependency
        raise ImportError("to_dataset needs the `datasets` library: pip install datasets") from error
    rows = to_rows(examples)
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "prompt": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
            "question": datasets.Value("string"),
            "kind": datasets.Value("string"),
            "description": datasets.Value("string"),
        }
    )
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def split_words(text: str) -> list[str]:
    """Split like the `Whitespace` pre-tokenizer: runs of word characters, runs of punctuation."""
    return _WORD_PATTERN.findall(text)


def vocabulary(kinds: Sequence[str] = QUESTION_KINDS) -> list[str]:
    """Every word a question or an answer of these kinds can contain (sorted; `<image>` excluded).

    Built from the templates and all colours, shapes, positions and counts, not from sampled data,
    so a tokenizer built from it covers every example the generator can produce.
    """
    kinds = _check_kinds(kinds)
    texts = [TEMPLATES[kind] for kind in kinds]
    texts += list(COLORS) + list(SHAPES) + list(POSITIONS) + [str(count) for count in range(MAX_OBJECTS + 1)]
    words = set()
    for text in texts:
        words.update(split_words(re.sub(r"\{\w+\}", " ", text)))
    return sorted(words)


__all__ = [
    "BUDGETS",
    "COLORS",
    "DEMO_IMAGE_SIZE",
    "DEFAULT_KINDS",
    "IMAGE_PLACEHOLDER",
    "POSITIONS",
    "QUESTION_KINDS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "SyntheticExample",
    "DemoBudget",
    "ask",
    "demo_splits",
    "generate_examples",
    "generate_splits",
    "random_scene",
    "split_words",
    "to_dataset",
    "to_rows",
    "vocabulary",
]
