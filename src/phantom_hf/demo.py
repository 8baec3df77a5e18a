"""`phantom-hf demo`: the whole life of a Phantom model, offline, on a CPU, in a few minutes.

1. A synthetic visual task (coloured shapes drawn with Pillow; questions about colour, shape, count and
   position, each with its correct and an incorrect-and-ambiguous answer: Phantom triples).
2. A small Phantom model built from scratch (a Llama-family LLM, an InternViT-style vision tower, Phantom
   Dimension on) and a tokenizer built offline.
3. A short warm-up of the LLM on the questions and answers as text, so the tiny LLM can write answers.
4. The paper's two-step recipe through `PhantomPOTrainer`: step 1, LLM frozen, projector + Phantom modules
   trained with Phantom Optimization; step 2, everything trained with SFT, first on the questions that name a
   grid cell (a curriculum), then on all questions.
5. Held-out exact-match accuracy before and after; a Hub-ready folder with a rendered model card; the folder
   reloaded with `AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)` and a few held-out
   questions answered through `pipeline("image-text-to-text")`.

The learning rates are far above the paper's 1e-5: that value is for fine-tuning pretrained 0.5B-7B models,
while this model starts from random weights. The schedule keeps the recipe's shape (cosine to a tenth).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants

from .answering import answer_questions
from .modeling import PhantomConfig, PhantomForConditionalGeneration
from .modeling.configuration_phantom import is_phantom_name
from .modeling.processing_phantom import IMAGE_CONTEXT_TOKEN, PhantomProcessor
from .hub import save_model_folder
from .recipe import RecipeStep, StepResult, run_recipe
from .synthetic import BUDGETS, DEMO_IMAGE_SIZE, DemoBudget, SyntheticExample, demo_splits, to_dataset, vocabulary
from .threads import use_cpu_thread_policy
from .tiny import tiny_text_config, tiny_vision_config
from .tokenization import build_tokenizer

CHANCE_NOTE = "chance: 1/4 for colour and position, 1/3 for shape and count"
# Questions that name a grid cell. Step 2 starts on these alone (a curriculum): mixed with the count questions
# from the start, the tiny model settles on reading the image as a whole and stalls near chance on them.
CELL_KINDS = ("color", "shape")


@dataclass
class DemoResult:
    """What the demo measured, for the summary table and for tests."""

    accuracy_before: float
    accuracy_after_step1: float
    accuracy_after: float
    accuracy_by_kind: dict[str, float]
    reloaded_accuracy: float
    pipeline_answers: list[dict[str, str]]
    seconds: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    folder: str = ""


def build_model(tokenizer: Any, image_size: int = DEMO_IMAGE_SIZE, seed: int = 0) -> PhantomForConditionalGeneration:
    """A small Phantom model: 4-layer Llama (GQA) + 2-layer InternViT on `image_size` px tiles of 7 px patches."""
    text_config = tiny_text_config(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    vision_config = tiny_vision_config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=[image_size] * 2
    )
    config = PhantomConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN),
    )
    torch.manual_seed(seed)
    model = PhantomForConditionalGeneration(config)
    # transformers initialises InternViT's position embeddings to zero (right for loading pretrained weights);
    # a tower trained from scratch needs them random, or its tokens do not know which cell they come from
    with torch.no_grad():
        model.vision_tower.embeddings.position_embeddings.normal_(0.0, 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def answer_examples(
    model: PhantomForConditionalGeneration,
    processor: PhantomProcessor,
    examples: list[SyntheticExample],
    batch_size: int = 50,
) -> list[str]:
    """Greedy answers (4 new tokens, stripped) of `model` to `examples`, in batches of `batch_size` (left padding)."""
    model.eval()
    return answer_questions(
        model, processor, [example.prompt for example in examples], [[example.image] for example in examples],
        batch_size=batch_size, max_new_tokens=4,
    )  # fmt: skip


def evaluate(
    model: PhantomForConditionalGeneration,
    processor: PhantomProcessor,
    examples: list[SyntheticExample],
    batch_size: int = 50,
) -> tuple[float, dict[str, float]]:
    """Exact-match accuracy of greedy answers on `examples`, overall and per question kind (`phantom-hf eval
    --tasks phantom_synthetic` computes the same number through lmms-eval)."""
    hits: dict[str, list[bool]] = {}
    for example, answer in zip(examples, answer_examples(model, processor, examples, batch_size)):
        hits.setdefault(example.kind, []).append(answer == example.chosen)
    every = [hit for kind_hits in hits.values() for hit in kind_hits]
    return sum(every) / len(every), {kind: sum(kind_hits) / len(kind_hits) for kind, kind_hits in sorted(hits.items())}


def _trainer_config(output_dir: Path, stage: int, steps: int, budget: DemoBudget, seed: int, **overrides: Any):
    from .trainer import PhantomPOConfig

    return PhantomPOConfig(
        output_dir=str(output_dir),
        training_stage=stage,
        max_steps=steps,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate,
        warmup_steps=min(20, steps // 10),
        gradient_checkpointing=False,  # a tiny model: memory is not the constraint, time is
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=seed,
        disable_tqdm=False,
        **overrides,
    )


# Environment of the demo's run: no Hub access (everything is built locally), no telemetry, no tokenizer threads.
_DEMO_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """The Hub offline (environment and huggingface_hub's setting) while the block runs; restored after, so that
    importing or running the demo leaves the rest of the process as it was."""
    saved_environment = {name: os.environ.get(name) for name in _DEMO_ENVIRONMENT}
    saved_offline = constants.HF_HUB_OFFLINE
    os.environ.update({name: os.environ.get(name) or value for name, value in _DEMO_ENVIRONMENT.items()})
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_offline
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_output_folder(out: str | Path) -> Path:
    """`out` as a Path when it is new or an empty folder; the demo writes a whole model folder there (config.json,
    README.md, weights), so a folder with files in it is refused before any training."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"--out {str(out)!r} is not empty: the demo writes a model folder there and would overwrite its files; "
            "pass a new or empty folder"
        )
    return out


def run_demo(out: str | Path, seed: int = 0, budget: str | DemoBudget = "full", use_po: bool = True, show: int = 4) -> DemoResult:
    """Run the demo end to end, offline, write the model folder to `out` (new or empty: checked first), print
    progress and a summary table."""
    out = check_output_folder(out)
    with offline_hub():
        return _run_demo(out, seed, budget, use_po, show)


def _run_demo(out: Path, seed: int, budget: str | DemoBudget, use_po: bool, show: int) -> DemoResult:
    budget = BUDGETS[budget] if isinstance(budget, str) else budget
    timings: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(seed)

    train_examples, test_examples = demo_splits(budget, seed)
    tokenizer = build_tokenizer(vocabulary(), padding_side="right", model_max_length=256)
    model = build_model(tokenizer, image_size=DEMO_IMAGE_SIZE, seed=seed)
    processor = PhantomProcessor.from_config(model.config, tokenizer, max_patches=1)
    parameters = {
        "total": sum(p.numel() for p in model.parameters()),
        "phantom": sum(p.numel() for n, p in model.named_parameters() if is_phantom_name(n)),
    }
    print(f"task: {len(train_examples)} training questions, {len(test_examples)} held-out ({CHANCE_NOTE})")
    print(f"model: {parameters['total']:,} parameters, {parameters['phantom']:,} of them Phantom Dimension")

    accuracy_before, _ = evaluate(model, processor, test_examples)
    print(f"held-out accuracy before training: {accuracy_before:.1%}")
    timings["setup"] = time.perf_counter() - start

    image_rows = to_dataset(train_examples)
    text_rows = image_rows.map(lambda row: {"prompt": row["question"], "images": []}, desc="text-only warm-up rows")
    cell_rows = image_rows.filter(lambda kind: kind in CELL_KINDS, input_columns="kind", desc="cell questions")
    step1_objective = "PO (Eq. 4)" if use_po else "SFT only (--no-po)"
    # (card name, what the demo prints before the step, its stage, its optimizer steps, its rows, config overrides)
    phases = [
        ("warm-up (text only, SFT)", "warm-up: the LLM learns to write answers from the questions alone (no images)",
         2, budget.warmup_steps, text_rows, {}),
        ("step 1 (PO)" if use_po else "step 1 (SFT)", f"step 1: LLM frozen, projector + Phantom modules, {step1_objective}",
         1, budget.step1_steps, image_rows, {"po_weight": 1.0 if use_po else 0.0}),
        (f"step 2a (SFT, {' and '.join(CELL_KINDS)} questions)",
         f"step 2a: everything trainable, SFT, on the questions that name a cell ({', '.join(CELL_KINDS)}) first",
         2, budget.step2_cell_steps, cell_rows, {}),
        ("step 2b (SFT, all questions)", "step 2b: everything trainable, SFT, all questions", 2, budget.step2_steps, image_rows, {}),
    ]  # fmt: skip
    announcements = iter([phase[1] for phase in phases[1:]])
    accuracy_after_step1 = 0.0

    def after_step(step: StepResult) -> None:
        nonlocal accuracy_after_step1
        if step.step.config.training_stage == 1:
            accuracy_after_step1, _ = evaluate(model, processor, test_examples)
            print(f"held-out accuracy after step 1: {accuracy_after_step1:.1%}")
        announcement = next(announcements, None)
        if announcement is not None:
            print(announcement)

    with tempfile.TemporaryDirectory() as scratch:
        phase_start = time.perf_counter()
        steps = [
            RecipeStep(_trainer_config(Path(scratch) / f"phase{index}", stage, max_steps, budget, seed, **overrides), rows, name)
            for index, (name, _, stage, max_steps, rows, overrides) in enumerate(phases)
        ]
        print(phases[0][1])
        trained = run_recipe(model, processor, steps, on_step_end=after_step)
        timings["training"] = time.perf_counter() - phase_start

    accuracy_after, by_kind = evaluate(model, processor, test_examples)
    print(f"held-out accuracy after training: {accuracy_after:.1%}  " + ", ".join(f"{k} {v:.0%}" for k, v in by_kind.items()))

    out.mkdir(parents=True, exist_ok=True)
    save_model_folder(
        out,
        model,
        processor,
        card={
            "datasets": ["synthetic-shapes (generated by phantom-hf demo)"],
            "training": trained.training,
            "eval_results": {
                "held-out exact match (before)": f"{accuracy_before:.1%}",
                "held-out exact match (after)": f"{accuracy_after:.1%}",
                **{f"held-out exact match: {kind}": f"{value:.1%}" for kind, value in by_kind.items()},
            },
            "example_question": test_examples[0].question,
        },
    )

    reloaded_accuracy, answers = check_reload(out, test_examples, show)
    timings["total"] = time.perf_counter() - start
    result = DemoResult(
        accuracy_before=accuracy_before,
        accuracy_after_step1=accuracy_after_step1,
        accuracy_after=accuracy_after,
        accuracy_by_kind=by_kind,
        reloaded_accuracy=reloaded_accuracy,
        pipeline_answers=answers,
        seconds=timings,
        parameters=parameters,
        folder=str(out.resolve()),
    )
    print_summary(result, use_po)
    return result


def check_reload(folder: Path, examples: list[SyntheticExample], show: int) -> tuple[float, list[dict[str, str]]]:
    """Reload the folder as Hub remote code, re-measure accuracy, answer `show` questions with the pipeline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    accuracy, _ = evaluate(model, processor, examples)
    chat = pipeline("image-text-to-text", model=model, processor=processor)
    answers = []
    for example in examples[:show]:
        messages = [{"role": "user", "content": [{"type": "image", "image": example.image}, {"type": "text", "text": example.question}]}]
        output = chat(text=messages, max_new_tokens=4, return_full_text=False)
        answer = output[0]["generated_text"].strip()
        answers.append({"image": example.description, "question": example.question, "answer": answer, "truth": example.chosen})
        print(f"  image: {example.description}\n  question: {example.question}\n  answer: {answer}   (truth: {example.chosen})\n")
    return accuracy, answers


def print_summary(result: DemoResult, use_po: bool) -> None:
    rows = [
        ("held-out accuracy before", f"{result.accuracy_before:.1%}"),
        ("held-out accuracy after step 1", f"{result.accuracy_after_step1:.1%}"),
        ("held-out accuracy after step 2", f"{result.accuracy_after:.1%}"),
        ("reloaded from the folder", f"{result.reloaded_accuracy:.1%}"),
        ("step 1 objective", "PO (SFT + SimPO, Eq. 4)" if use_po else "SFT only"),
        ("training time", f"{result.seconds['training']:.0f} s"),
        ("total time", f"{result.seconds['total']:.0f} s"),
        ("parameters (Phantom Dimension)", f"{result.parameters['total']:,} ({result.parameters['phantom']:,})"),
        ("model folder", result.folder),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n" + "=" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * (width + 40))


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="phantom-demo", help="where the Hub-ready model folder is written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full", help="'quick' is the test suite's budget")
    parser.add_argument("--no-po", action="store_true", help="step 1 with plain SFT instead of PO (same budget)")


def main(args: argparse.Namespace) -> int:
    use_cpu_thread_policy()
    result = run_demo(args.out, seed=args.seed, budget=args.budget, use_po=not args.no_po)
    return 0 if result.reloaded_accuracy == result.accuracy_after else 1


__all__ = [
    "BUDGETS",
    "DemoBudget",
    "DemoResult",
    "add_demo_arguments",
    "answer_examples",
    "build_model",
    "check_output_folder",
    "evaluate",
    "main",
    "offline_hub",
    "run_demo",
]
