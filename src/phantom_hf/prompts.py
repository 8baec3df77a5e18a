"""The published Phantom evaluation prompts: per-benchmark instruction suffixes and answer lengths, as data.

Source: github ByungKwanLee/Phantom, `utils/utils.py`: `make_instruction` (lines 77-96) appends the suffixes,
`get_max_new_tokens` (lines 106-117) sets the answer lengths; `test.py` (line 130) generates greedily with 3 beams
(`do_sample=False, num_beams=3`). Read from the repository's HEAD; nothing of it is copied here but the strings.

    >>> from phantom_hf.prompts import benchmark_prompt, apply_benchmark_prompt
    >>> benchmark_prompt("mmbench")
    BenchmarkPrompt(suffix="\\nAnswer with the option's letter from the given choices directly.", max_new_tokens=5)
    >>> apply_benchmark_prompt("Which animal is shown?\\nA. cat\\nB. dog", "mmbench")
    "<image>Which animal is shown?\\nA. cat\\nB. dog\\nAnswer with the option's letter from the given choices directly."

The result is the user turn's text; the processor's chat template wraps it (a converted published checkpoint's
processor writes `<image>` glued to the question, as the published code does), and `max_new_tokens` and
`PUBLISHED_GENERATION` go to `generate`.

One deviation, on purpose: the published `make_instruction` glues `"<image>"` to the question only for its demo
(the condition reads `dataset == "demo"`), and the loaders add it only for HallusionBench and MathVerse image
questions, so that the other image benchmarks, read literally, reach `generate` without image tokens (which asserts
there are some). `apply_benchmark_prompt` puts `<image>` in front of every question that has an image and no
marker yet, the demo's form, which is the only one that gives the model its image.
"""

from __future__ import annotations

from dataclasses import dataclass

from .modeling.processing_phantom import IMAGE_MARKER

MULTIPLE_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
YES_NO_SUFFIX = "\nPlease answer yes or no."

# How the published evaluation generates (test.py line 130), besides max_new_tokens.
PUBLISHED_GENERATION: dict[str, object] = {"do_sample": False, "num_beams": 3}


@dataclass(frozen=True)
class BenchmarkPrompt:
    """What the published evaluation adds to a benchmark's question (`suffix`, appended unless the question
    already ends a yes/no question with it) and how many tokens it lets the answer have."""

    suffix: str
    max_new_tokens: int


_MULTIPLE_CHOICE = (
    "sqa", "mmbench", "mmbench_cn", "mmbench_dev", "mmbench_cn_dev", "seed", "seed-2-plus", "qbench", "ai2d",
    "mmstar", "cvbench", "blink",
)  # fmt: skip
# Benchmark name (as the published code spells it) -> its prompt. Names without a suffix get the question as it is.
BENCHMARK_PROMPTS: dict[str, BenchmarkPrompt] = {
    **{name: BenchmarkPrompt(MULTIPLE_CHOICE_SUFFIX, 5) for name in _MULTIPLE_CHOICE},
    "pope": BenchmarkPrompt(SHORT_ANSWER_SUFFIX, 5),
    "chartqa": BenchmarkPrompt(SHORT_ANSWER_SUFFIX, 5),
    "hallusionbench": BenchmarkPrompt(YES_NO_SUFFIX, 5),
    "mme": BenchmarkPrompt("", 5),  # MME's questions end with "Please answer yes or no." themselves
    "llava": BenchmarkPrompt("", 1024),
    "llava_wilder": BenchmarkPrompt("", 1024),
    "mm-vet": BenchmarkPrompt("", 1024),
    "mm-vet-v2": BenchmarkPrompt("", 1024),
    "mathvista": BenchmarkPrompt("", 512),
    "mathverse": BenchmarkPrompt("", 512),
    "visualwebbench": BenchmarkPrompt("", 512),
}
# Other spellings the published code uses for the same benchmarks (config.py's EVAL_DATASETS says "mmvet").
ALIASES: dict[str, str] = {"mmvet": "mm-vet", "mmvet-v2": "mm-vet-v2", "mm-vet-2": "mm-vet-v2"}


def benchmark_prompt(name: str) -> BenchmarkPrompt:
    """The published prompt settings of benchmark `name` (case-insensitive; `BENCHMARK_PROMPTS` lists them).
    `ValueError` listing the known names for another one."""
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in BENCHMARK_PROMPTS:
        raise ValueError(f"no published Phantom prompt for benchmark {name!r}; known: {', '.join(sorted(BENCHMARK_PROMPTS))}")
    return BENCHMARK_PROMPTS[key]


def apply_benchmark_prompt(question: str, name: str, image: bool = True) -> str:
    """`question` as the published evaluation asks it on benchmark `name`: `<image>` glued in front when the
    question has an image and no marker yet, then the question, then the benchmark's suffix (for HallusionBench
    only when the question does not already say "Please answer yes or no.")."""
    prompt = benchmark_prompt(name)
    text = IMAGE_MARKER + question if image and IMAGE_MARKER not in question else question
    if prompt.suffix == YES_NO_SUFFIX and YES_NO_SUFFIX.strip() in question:
        return text
    return text + prompt.suffix


__all__ = [
    "ALIASES",
    "BENCHMARK_PROMPTS",
    "MULTIPLE_CHOICE_SUFFIX",
    "PUBLISHED_GENERATION",
    "SHORT_ANSWER_SUFFIX",
    "YES_NO_SUFFIX",
    "BenchmarkPrompt",
    "apply_benchmark_prompt",
    "benchmark_prompt",
]
