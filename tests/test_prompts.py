"""The published per-benchmark prompts (`phantom_hf.prompts`) against the published rules, restated here.

The published rules (github ByungKwanLee/Phantom, utils/utils.py `make_instruction` lines 77-96 and
`get_max_new_tokens` lines 106-117), written out as sets of names, independently of the module's table.
"""

from __future__ import annotations

import doctest

import pytest

from phantom_hf import prompts
from phantom_hf.prompts import PUBLISHED_GENERATION, apply_benchmark_prompt, benchmark_prompt

LETTER = "Answer with the option's letter from the given choices directly."
SHORT = "Answer the question using a single word or phrase."
PUBLISHED_LETTER = {"sqa", "mmbench", "mmbench_cn", "mmbench_dev", "mmbench_cn_dev", "seed", "seed-2-plus", "qbench", "ai2d", "mmstar", "cvbench", "blink"}
PUBLISHED_SHORT = {"pope", "chartqa"}
PUBLISHED_FIVE = {"mme", "pope", "sqa", "mmbench", "mmbench_cn", "mmbench_dev", "mmbench_cn_dev", "seed", "seed-2-plus", "qbench", "ai2d", "mmstar", "chartqa", "hallusionbench", "cvbench", "blink"}  # fmt: skip
PUBLISHED_1024 = {"llava", "llava_wilder", "mm-vet", "mm-vet-v2"}
PUBLISHED_512 = {"mathvista", "mathverse", "visualwebbench"}


def published_instruction(question: str, dataset: str) -> str:
    """The published suffix rule, with `<image>` glued in front as its demo path does."""
    question = "<image>" + question
    if dataset in PUBLISHED_LETTER:
        return question + "\n" + LETTER
    if dataset in PUBLISHED_SHORT:
        return question + "\n" + SHORT
    if dataset == "hallusionbench" and "Please answer yes or no." not in question:
        return question + "\nPlease answer yes or no."
    return question


@pytest.mark.parametrize("name", sorted(PUBLISHED_FIVE | PUBLISHED_1024 | PUBLISHED_512))
def test_every_published_benchmark_has_its_suffix_and_length(name: str) -> None:
    expected_length = 5 if name in PUBLISHED_FIVE else 1024 if name in PUBLISHED_1024 else 512
    assert benchmark_prompt(name).max_new_tokens == expected_length
    assert benchmark_prompt(name.upper()) == benchmark_prompt(name)
    for question in ("What is shown?\nA. a cat\nB. a dog", "Is the sky green?"):
        assert apply_benchmark_prompt(question, name) == published_instruction(question, name)


def test_hallusionbench_asks_yes_or_no_once_and_markers_are_not_doubled() -> None:
    asked = "<image>Is it red? Please answer yes or no."
    assert apply_benchmark_prompt(asked, "hallusionbench") == asked
    assert apply_benchmark_prompt("Is it red?", "hallusionbench", image=False) == "Is it red?\nPlease answer yes or no."
    assert apply_benchmark_prompt("<image>Which?", "ai2d") == "<image>Which?\n" + LETTER


def test_aliases_unknown_names_and_generation_settings() -> None:
    assert benchmark_prompt("mmvet") == benchmark_prompt("mm-vet") and benchmark_prompt("mmvet-v2").max_new_tokens == 1024
    with pytest.raises(ValueError, match="no published Phantom prompt for benchmark 'gqa'; known: ai2d, blink"):
        benchmark_prompt("gqa")
    assert PUBLISHED_GENERATION == {"do_sample": False, "num_beams": 3}


def test_module_examples_run() -> None:
    result = doctest.testmod(prompts)
    assert (result.attempted, result.failed) == (3, 0)
