"""lmms-eval through the `phantom` model, offline: local tasks (Pillow images, `save_to_disk` data), a tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lmms_eval", reason='lmms-eval is not installed (pip install "phantom-hf[eval]")')
datasets = pytest.importorskip("datasets")

from PIL import Image  # noqa: E402

from phantom_hf.demo import answer_examples, build_model, evaluate  # noqa: E402
from phantom_hf.evaluation import (  # noqa: E402
    LMMS_TASKS,
    SYNTHETIC_TASK,
    LmmsTask,
    card_eval_results,
    lmms_task,
    parse_task_map,
    published_question,
    task_yaml,
    write_synthetic_task,
)
from phantom_hf.modeling.processing_phantom import PhantomProcessor  # noqa: E402
from phantom_hf.prompts import MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX  # noqa: E402
from phantom_hf.synthetic import generate_splits, split_words, vocabulary  # noqa: E402
from phantom_hf.tokenization import build_tokenizer  # noqa: E402

LMMS_POST_PROMPT = "\nAnswer briefly."  # the local tasks' own instruction, which the published prompt replaces
QUESTIONS = ["Is the square red?", "Is the circle blue?", "Is the square green?", "Is the circle red?"]
TEXTS = QUESTIONS + [MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX, LMMS_POST_PROMPT, "A. yes B. no", "A B yes no"]


def _tokenizer_words() -> list[str]:
    words = set(vocabulary())
    for text in TEXTS:
        words.update(split_words(text))
    return sorted(words)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Phantom folder (the demo's architecture, random weights) with its processor."""
    path = tmp_path_factory.mktemp("phantom-tiny")
    tokenizer = build_tokenizer(_tokenizer_words(), padding_side="right", model_max_length=256)
    model = build_model(tokenizer, image_size=28, seed=0)
    processor = PhantomProcessor.from_config(model.config, tokenizer, max_patches=1)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _image(seed: int) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (28, 28), (255, 255, 255))
    for x in range(0, 28, 7):
        for y in range(0, 28, 7):
            image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 7, y + 7))
    return image


_HOOKS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return kwargs.get("pre_prompt", "") + doc["question"] + kwargs.get("post_prompt", "")


def mc_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nA. yes B. no" + (lmms_eval_specific_kwargs or {}).get("post_prompt", "")


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}


def doc_to_choice(doc):
    return ["yes", "no"]
'''


def _write_tasks(root: Path) -> Path:
    """Three local tasks over one `save_to_disk` dataset: short answer (generation), multiple choice by letter
    (generation) and multiple choice by likelihood."""
    rows = {
        "image": [_image(seed) for seed in range(len(QUESTIONS))],
        "question": QUESTIONS,
        "answer": ["yes", "no", "no", "yes"],
        "letter": ["A", "B", "B", "A"],
        "label": [0, 1, 1, 0],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "letter": datasets.Value("string"),
            "label": datasets.Value("int64"),
        }
    )
    data = root / "data"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(data))
    (root / "utils.py").write_text(_HOOKS, encoding="utf-8")
    common = {
        "dataset_path": str(data),
        "dataset_kwargs": {"load_from_disk": True},
        "test_split": "test",
        "doc_to_visual": "!function utils.doc_to_visual",
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "", "post_prompt": LMMS_POST_PROMPT}},
        "metadata": {"version": 1.0},
    }
    generation = {
        "output_type": "generate_until",
        "generation_kwargs": {"max_new_tokens": 16, "until": ["\n\n"]},
        "process_results": "!function utils.process_results",
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    tasks = {
        "tiny_short": {**common, **generation, "doc_to_text": "!function utils.doc_to_text", "doc_to_target": "answer"},
        "tiny_letter": {
            **common,
            **generation,
            # lmms-eval's own way for a task to prompt one model differently: the entry named after the model
            "lmms_eval_specific_kwargs": {
                "default": {"pre_prompt": "", "post_prompt": LMMS_POST_PROMPT},
                "phantom": {"pre_prompt": "", "post_prompt": ""},
            },
            "doc_to_text": "!function utils.mc_text",
            "doc_to_target": "letter",
        },
        "tiny_likelihood": {
            **common,
            "output_type": "multiple_choice",
            "doc_to_text": "!function utils.doc_to_text",
            "doc_to_choice": "!function utils.doc_to_choice",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
    }
    for name, config in tasks.items():
        (root / f"{name}.yaml").write_text(task_yaml({"task": name, **config}), encoding="utf-8")
    return root


def _evaluate(model: Any, tasks: list[str], include_path: Path, **kwargs: Any) -> dict[str, Any]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), model_name="phantom")
    return simple_evaluate(model=model, tasks=tasks, task_manager=manager, bootstrap_iters=0, log_samples=True, **kwargs)


class _Spy:
    """Records the `text` every processor call gets and the options of every `generate` call."""

    def __init__(self, lmms_model: Any) -> None:
        self.texts: list[str] = []
        self.generate_options: list[dict[str, Any]] = []
        processor_call = lmms_model.processor.__class__.__call__
        processor = lmms_model.processor
        generate = lmms_model.model.generate

        def call(*args: Any, **kwargs: Any) -> Any:
            assert "videos" not in kwargs and "audios" not in kwargs
            self.texts.extend(kwargs["text"])
            return processor_call(processor, *args, **kwargs)

        def spy_generate(**kwargs: Any) -> Any:
            options = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
            self.generate_options.append({**options, "rows": len(kwargs["input_ids"])})
            return generate(**kwargs)

        lmms_model.processor = _Proxy(processor, call)
        lmms_model.model.generate = spy_generate


class _Proxy:
    def __init__(self, target: Any, call: Any) -> None:
        self._target, self._call = target, call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def test_published_prompt_replaces_lmms_instruction() -> None:
    mme = LMMS_TASKS["mme"]
    question = "Is there a cat in the image? Please answer yes or no."
    assert published_question(question + mme.post_prompt, mme) == question  # MME: no published suffix
    pope = lmms_task("pope_adv")  # a subtask maps like its group
    assert published_question("Is there a dog?" + SHORT_ANSWER_SUFFIX, pope) == "Is there a dog?" + SHORT_ANSWER_SUFFIX
    chart = LMMS_TASKS["chartqa"]
    assert published_question("What is the max?" + chart.post_prompt, chart) == "What is the max?" + SHORT_ANSWER_SUFFIX
    vet = LMMS_TASKS["mmvet"]
    assert published_question(vet.pre_prompt + "What is shown?", vet) == "What is shown?"
    assert lmms_task("unknown_task") is None
    with pytest.raises(ValueError, match="no published Phantom prompt"):
        parse_task_map("mine:imagenet")
    with pytest.raises(ValueError, match="task:benchmark"):
        parse_task_map("mine")


def test_lmms_task_instructions_match_installed_lmms_eval() -> None:
    """The pre/post prompts `LMMS_TASKS` strips are the ones the installed lmms-eval writes."""
    import yaml
    from lmms_eval.tasks import TaskManager

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    manager = TaskManager(model_name="phantom")

    def config(name: str) -> dict[str, Any]:
        path = Path(manager.task_index[name]["yaml_path"])
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}
        if "include" in data:
            data = {**config_file(path.parent / data["include"]), **data}
        return data

    def config_file(path: Path) -> dict[str, Any]:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}

    for name, task in LMMS_TASKS.items():
        if name == "seedbench":  # its instruction is written by utils.seed_doc_to_text
            source = (Path(manager.task_index[name]["yaml_path"]).parent / "utils.py").read_text(encoding="utf-8")
            assert "Answer with the option's letter from the given choices directly." in source
            continue
        if manager.task_index[name]["type"] != "task":
            continue  # a group (mathvista_testmini): asked as lmms-eval writes it
        default = (config(name).get("lmms_eval_specific_kwargs") or {}).get("default") or {}
        assert default.get("pre_prompt", "") == task.pre_prompt, name
        assert default.get("post_prompt", "") == task.post_prompt, name


def test_generation_tasks_get_published_prompts_and_scores(folder: Path, tmp_path: Path) -> None:
    from phantom_hf.lmms_eval_phantom import PhantomLMMS

    include = _write_tasks(tmp_path / "tasks")
    # tiny_short: lmms-eval's instruction removed by the model (as for the built-in tasks of LMMS_TASKS)
    task_map = {"tiny_letter": "mmbench", "tiny_short": LmmsTask("pope", post_prompt=LMMS_POST_PROMPT)}
    model = PhantomLMMS(pretrained=str(folder), device="cpu", batch_size=3, task_map=task_map)
    spy = _Spy(model)
    results = _evaluate(model, ["tiny_short", "tiny_letter"], include)

    processor = model.processor
    expected = {processor.user_prompt(q + SHORT_ANSWER_SUFFIX, images=1) for q in QUESTIONS}
    expected |= {processor.user_prompt(q + "\nA. yes B. no" + MULTIPLE_CHOICE_SUFFIX, images=1) for q in QUESTIONS}
    assert set(spy.texts) == expected and len(spy.texts) == 8
    assert all(LMMS_POST_PROMPT not in text for text in spy.texts)
    assert all(text.startswith("<|im_start|>user\n<image>\n") and text.endswith("<|im_start|>assistant\n") for text in spy.texts)
    # published decoding: 5 new tokens, 3 beams; both tasks decode alike, so 8 requests go in batches of 3, 3, 2
    assert [options["max_new_tokens"] for options in spy.generate_options] == [5, 5, 5]
    assert [options["rows"] for options in spy.generate_options] == [3, 3, 2]
    assert all(options["num_beams"] == 3 and options["do_sample"] is False for options in spy.generate_options)

    for task in ("tiny_short", "tiny_letter"):
        samples = results["samples"][task]
        hits = [sample["exact_match"] for sample in samples]
        assert len(hits) == 4
        assert results["results"][task]["exact_match,none"] == pytest.approx(sum(hits) / 4)

    # the same requests one by one give the same answers as in batches of 3
    single = PhantomLMMS(pretrained=str(folder), device="cpu", batch_size=1, task_map=task_map)
    again = _evaluate(single, ["tiny_short"], include)
    assert [s["filtered_resps"] for s in again["samples"]["tiny_short"]] == [
        s["filtered_resps"] for s in results["samples"]["tiny_short"]
    ]


def test_multiple_choice_by_likelihood(folder: Path, tmp_path: Path) -> None:
    from phantom_hf.lmms_eval_phantom import PhantomLMMS

    include = _write_tasks(tmp_path / "tasks")
    model = PhantomLMMS(pretrained=str(folder), device="cpu", batch_size=4, dtype="float64")
    processor, network = model.processor, model.model  # lmms-eval drops the model's modules when it is done
    results = _evaluate(model, ["tiny_likelihood"], include)
    samples = results["samples"]["tiny_likelihood"]
    assert len(samples) == 4

    # reference: log p(choice | prompt) summed token by token, one sequence at a time, without padding
    hits = []
    for index, sample in enumerate(samples):
        doc = sample["doc"]
        prompt = processor.user_prompt(doc["question"] + LMMS_POST_PROMPT, images=1)
        scores = []
        for choice in ("yes", "no"):
            encoded = processor(text=[prompt], images=[[_image(sample["doc_id"])]], return_tensors="pt")
            target = processor.tokenizer(" " + choice, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            ids = torch.cat([encoded["input_ids"][0], target])[None]
            with torch.no_grad():
                logits = network(
                    input_ids=ids,
                    pixel_values=encoded["pixel_values"].to(torch.float64),
                    num_patches=encoded["num_patches"],
                ).logits[0]
            log_probs = torch.log_softmax(logits[len(ids[0]) - len(target) - 1 : -1], dim=-1)
            scores.append(log_probs.gather(1, target[:, None]).sum().item())
        logged = [float(resp[0][0]) for resp in sample["resps"]]  # lmms-eval's convention: a loss, lowest wins
        assert logged == pytest.approx([-score for score in scores], abs=1e-9), index
        hits.append(float(scores.index(max(scores)) == doc["label"]))
    assert results["results"]["tiny_likelihood"]["acc,none"] == pytest.approx(sum(hits) / 4)


def test_synthetic_task_equals_demo_accuracy(tmp_path: Path) -> None:
    """The demo's held-out split through lmms-eval: the same prompts, answers and accuracy as the demo's own
    evaluation of the same (here untrained) model."""
    from phantom_hf.lmms_eval_phantom import PhantomLMMS

    tokenizer = build_tokenizer(vocabulary(), padding_side="right", model_max_length=256)
    network = build_model(tokenizer, image_size=28, seed=1)
    processor = PhantomProcessor.from_config(network.config, tokenizer, max_patches=1)
    folder = tmp_path / "model"
    network.save_pretrained(folder)
    processor.save_pretrained(folder)
    _, test = generate_splits(400, 40, seed=0, image_size=28)  # the demo's quick budget
    own_accuracy, _ = evaluate(network, processor, test)

    include = write_synthetic_task(tmp_path / "task", seed=0, budget="quick")
    model = PhantomLMMS(pretrained=str(folder), device="cpu", batch_size=50)
    spy = _Spy(model)
    results = _evaluate(model, [SYNTHETIC_TASK], include)
    assert spy.texts == [processor.user_prompt(example.prompt) for example in test]
    assert [(options["max_new_tokens"], options["num_beams"], options["rows"]) for options in spy.generate_options] == [
        (4, 1, 50),
        (4, 1, 50),
        (4, 1, 50),
        (4, 1, 10),
    ]
    harness = results["results"][SYNTHETIC_TASK]["exact_match,none"]
    assert harness == pytest.approx(own_accuracy)

    # an untrained model scores ~0 either way: the answers themselves must be the demo's, one by one
    answers = [sample["filtered_resps"][0] for sample in results["samples"][SYNTHETIC_TASK]]
    assert answers == answer_examples(network, processor, test) and len(answers) == 160
    assert any(answers)


def test_card_renders_eval_results(folder: Path, tmp_path: Path) -> None:
    from phantom_hf.cli import main

    results = {"results": {"mme": {"alias": "mme", "mme_cognition_score,none": 312.5, "mme_percetion_score,none": 1500.25}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    assert card_eval_results(path) == {"mme mme_cognition_score": 312.5, "mme mme_percetion_score": 1500.25}
    out = tmp_path / "card.md"
    assert main(["card", str(folder), "--eval-results", str(path), "--output", str(out)]) == 0
    card = out.read_text(encoding="utf-8")
    assert "| mme mme_cognition_score | 312.5 |" in card
    with pytest.raises(ValueError, match="not an lmms-eval result"):
        card_eval_results({"accuracy": 1})


def test_lmms_eval_finds_the_phantom_model() -> None:
    """`lmms-eval --model phantom` resolves through the package's entry point."""
    from lmms_eval.models import get_model

    from phantom_hf.lmms_eval_phantom import PhantomLMMS

    assert get_model("phantom") is PhantomLMMS


def test_cli_eval_prints_table_writes_json(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from phantom_hf.cli import main

    out = tmp_path / "eval"
    argv = ["eval", str(folder), "--tasks", SYNTHETIC_TASK, "--synthetic-budget", "quick", "--limit", "6"]
    assert main([*argv, "--batch-size", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    score = results["results"][SYNTHETIC_TASK]["exact_match,none"]
    assert f"| {SYNTHETIC_TASK} | exact_match | {score:.4g} |" in printed
    assert results["n-samples"][SYNTHETIC_TASK]["effective"] == 6
    card = tmp_path / "card.md"
    assert main(["card", str(folder), "--eval-results", str(out / "results.json"), "--output", str(card)]) == 0
    assert f"| {SYNTHETIC_TASK} exact_match | {round(score, 4):.6g}" in card.read_text(encoding="utf-8")

    assert main(["eval", str(tmp_path / "missing"), "--tasks", "mme"]) == 2
    assert "not a saved model folder" in capsys.readouterr().err
