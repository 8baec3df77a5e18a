"""Evaluation of Phantom checkpoints through lmms-eval, with the published Phantom prompts.

This module needs no lmms-eval to import: it holds the mapping of lmms-eval task names to the benchmarks of the
paper's Tables 1-2 (`LMMS_TASKS`), how a task's context becomes the published question (`published_question`),
the offline synthetic task of `phantom-hf demo` as an lmms-eval task (`write_synthetic_task`), and the tables of
lmms-eval's results. The model class lmms-eval loads, `PhantomLMMS`, and the runner behind `phantom-hf eval`,
`run_lmms_eval`, live in `phantom_hf.lmms_eval_phantom`, which needs lmms-eval (`pip install "phantom-hf[eval]"`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .prompts import MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX, benchmark_prompt

SYNTHETIC_TASK = "phantom_synthetic"
# The decoding of the demo's own evaluation (`phantom_hf.demo.evaluate`): greedy, 4 new tokens.
SYNTHETIC_MAX_NEW_TOKENS = 4


@dataclass(frozen=True)
class LmmsTask:
    """How an lmms-eval task relates to a benchmark of the published evaluation: the published benchmark name
    (a key of `phantom_hf.prompts.BENCHMARK_PROMPTS`) and the instruction lmms-eval's own prompt puts before
    (`pre_prompt`) and after (`post_prompt`) the question, which the published prompt replaces."""

    benchmark: str
    pre_prompt: str = ""
    post_prompt: str = ""


# lmms-eval 0.7.x task name -> benchmark. The pre/post prompts are the `default` ones of the task's YAML in
# lmms-eval 0.7.3 (seedbench writes its instruction in `utils.seed_doc_to_text`); tests/test_lmms_eval.py checks
# them against the installed lmms-eval. A task whose name starts with a key and an underscore (a group's subtasks,
# such as mathvista_testmini_format) maps like the key.
LMMS_TASKS: dict[str, LmmsTask] = {
    "scienceqa_img": LmmsTask("sqa", post_prompt=MULTIPLE_CHOICE_SUFFIX),
    "ai2d": LmmsTask("ai2d", post_prompt=MULTIPLE_CHOICE_SUFFIX),
    "chartqa": LmmsTask("chartqa", post_prompt="\nAnswer the question with a single word."),
    "seedbench": LmmsTask("seed", post_prompt=MULTIPLE_CHOICE_SUFFIX),
    "pope": LmmsTask("pope", post_prompt=SHORT_ANSWER_SUFFIX),
    "hallusion_bench_image": LmmsTask("hallusionbench"),
    "mme": LmmsTask("mme", post_prompt=SHORT_ANSWER_SUFFIX),
    "mathvista_testmini": LmmsTask("mathvista"),
    "mmbench_en_dev": LmmsTask("mmbench", post_prompt=MULTIPLE_CHOICE_SUFFIX),
    "mmbench_cn_dev": LmmsTask("mmbench_cn", post_prompt="\n请直接使用所提供的选项字母作为答案回答。"),
    "mmvet": LmmsTask(
        "mm-vet",
        pre_prompt="First please perform reasoning, and think step by step to provide best answer to the following question: \n\n",
    ),
    "llava_in_the_wild": LmmsTask("llava"),
}
# The paper's Tables 1-2, as lmms-eval tasks (the README's command).
PAPER_TASKS: tuple[str, ...] = tuple(LMMS_TASKS)
# Tasks whose score needs an OpenAI model as judge or answer extractor (OPENAI_API_KEY): lmms-eval scores them
# with GPT; without a key their numbers are not the paper's.
GPT_JUDGED_TASKS: tuple[str, ...] = ("mmvet", "llava_in_the_wild", "mathvista_testmini")


def parse_task_map(value: str | Mapping[str, str | LmmsTask] | None) -> dict[str, LmmsTask]:
    """Extra task -> benchmark mappings: a mapping (to a benchmark name or an `LmmsTask`, which also names the
    task's own instruction to remove), or `"task:benchmark|task:benchmark"` (the form a `--model_args` value can
    carry). Each benchmark must be a published one (`ValueError` otherwise).

    A local task can instead give lmms-eval a `phantom` entry in its `lmms_eval_specific_kwargs` (lmms-eval uses
    the entry named after the model instead of `default`), with an empty `post_prompt`."""
    if not value:
        return {}
    if isinstance(value, str):
        pairs: list[tuple[str, str | LmmsTask]] = []
        for item in value.split("|"):
            task, sep, benchmark = item.partition(":")
            if not sep or not task.strip() or not benchmark.strip():
                raise ValueError(f"task_map entries are 'task:benchmark', separated by '|'; got {item!r}")
            pairs.append((task.strip(), benchmark.strip()))
    else:
        pairs = list(value.items())
    result = {}
    for task, target in pairs:
        entry = target if isinstance(target, LmmsTask) else LmmsTask(str(target))
        benchmark_prompt(entry.benchmark)  # ValueError naming the known benchmarks
        result[task] = entry
    return result


def lmms_task(task: str, extra: Mapping[str, LmmsTask] | None = None) -> LmmsTask | None:
    """The `LmmsTask` of lmms-eval task `task` (`extra` first, then `LMMS_TASKS`; a subtask `NAME_...` maps like
    `NAME`), or None for a task the published evaluation has no prompt for."""
    tables = [dict(extra or {}), LMMS_TASKS]
    for table in tables:
        if task in table:
            return table[task]
    for table in tables:
        prefixes = [name for name in table if task.startswith(name + "_")]
        if prefixes:
            return table[max(prefixes, key=len)]
    return None


def published_question(context: str, task: LmmsTask) -> str:
    """lmms-eval's context of `task` with its own instruction removed and the published suffix appended (the
    user text, without image markers: the chat template places those)."""
    question = context
    if task.pre_prompt and question.startswith(task.pre_prompt):
        question = question[len(task.pre_prompt) :]
    if task.post_prompt and question.endswith(task.post_prompt):
        question = question[: -len(task.post_prompt)]
    prompt = benchmark_prompt(task.benchmark)
    if prompt.suffix and question.endswith(prompt.suffix):
        return question
    if prompt.suffix.strip() == "Please answer yes or no." and prompt.suffix.strip() in question:
        return question
    return question + prompt.suffix


# ------------------------------------------------------------------------------ the demo's task

_SYNTHETIC_UTILS = '''\
"""lmms-eval hooks of the phantom-hf demo's synthetic task (written by phantom_hf.evaluation)."""

from phantom_hf.evaluation import synthetic_doc_to_text as doc_to_text  # noqa: F401
from phantom_hf.evaluation import synthetic_doc_to_visual as doc_to_visual  # noqa: F401
from phantom_hf.evaluation import synthetic_process_results as process_results  # noqa: F401
'''


def synthetic_doc_to_visual(doc: Mapping[str, Any]) -> list[Any]:
    """The image of a synthetic row (RGB)."""
    return [image.convert("RGB") for image in doc["images"]]


def synthetic_doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """The question of a synthetic row, as the demo asks it (the image goes in front, placed by the template)."""
    return doc["question"]


def synthetic_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Exact match of the stripped answer with the correct one: the demo's held-out accuracy."""
    return {"exact_match": float(results[0].strip() == doc["chosen"])}


def write_synthetic_task(directory: str | Path, seed: int = 0, budget: str = "full") -> Path:
    """Write the held-out split of `phantom-hf demo --seed SEED --budget BUDGET` as the lmms-eval task
    `phantom_synthetic` into `directory` (its YAML, its hooks and the data, no download); returns `directory`,
    the path to give lmms-eval as `--include_path`. The harness's `exact_match` equals the demo's held-out
    accuracy of the same model."""
    from .synthetic import demo_splits, to_dataset

    _, test = demo_splits(budget, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    import datasets

    datasets.DatasetDict({"test": to_dataset(test)}).save_to_disk(str(directory / "data"))
    (directory / "utils.py").write_text(_SYNTHETIC_UTILS, encoding="utf-8")
    config = {
        "task": SYNTHETIC_TASK,
        "dataset_path": str((directory / "data").resolve()),
        "dataset_kwargs": {"load_from_disk": True},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": "!function utils.doc_to_visual",
        "doc_to_text": "!function utils.doc_to_text",
        "doc_to_target": "chosen",
        "generation_kwargs": {"max_new_tokens": SYNTHETIC_MAX_NEW_TOKENS, "do_sample": False, "num_beams": 1},
        "process_results": "!function utils.process_results",
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "demo_seed": seed, "demo_budget": budget},
    }
    (directory / f"{SYNTHETIC_TASK}.yaml").write_text(task_yaml(config), encoding="utf-8")
    return directory


def task_yaml(config: Mapping[str, Any]) -> str:
    """An lmms-eval task YAML from a mapping; string values `"!function module.name"` become `!function` tags
    (lmms-eval imports `module.py` from the YAML's folder)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def represent(dumper: yaml.SafeDumper, value: str) -> Any:
        if value.startswith("!function "):
            return dumper.represent_scalar("!function", value[len("!function ") :])
        return dumper.represent_str(value)

    _Dumper.add_representer(str, represent)
    return yaml.dump(dict(config), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------- results


def metric_rows(results: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(task, metric, value) of lmms-eval's `results["results"]`, stderr entries and non-numbers left out."""
    rows = []
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            if key == "alias" or "stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            rows.append((task, key.split(",")[0], float(value)))
    return rows


def results_table(results: Mapping[str, Any]) -> str:
    """The numbers of an lmms-eval result as a Markdown table (task, metric, value)."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    lines += [f"| {task} | {metric} | {value:.4g} |" for task, metric, value in metric_rows(results)]
    return "\n".join(lines)


def card_eval_results(results: Mapping[str, Any] | str | Path) -> dict[str, float]:
    """`{"task metric": value}` of an lmms-eval result (a mapping or its JSON file): what
    `render_model_card(..., eval_results=...)` and `phantom-hf card --eval-results FILE` render."""
    if not isinstance(results, Mapping):
        path = Path(results)
        if not path.is_file():
            raise FileNotFoundError(f"lmms-eval results file {str(path)!r} does not exist")
        results = json.loads(path.read_text(encoding="utf-8"))
    if "results" not in results:
        raise ValueError("not an lmms-eval result: it has no 'results' entry")
    return {f"{task} {metric}": round(value, 4) for task, metric, value in metric_rows(results)}


__all__ = [
    "GPT_JUDGED_TASKS",
    "LMMS_TASKS",
    "PAPER_TASKS",
    "SYNTHETIC_TASK",
    "LmmsTask",
    "card_eval_results",
    "lmms_task",
    "metric_rows",
    "parse_task_map",
    "published_question",
    "results_table",
    "task_yaml",
    "write_synthetic_task",
]
