"""The paper's two-step training recipe (arXiv 2409.14713, Sec. 3), as one library function.

`run_recipe` trains a Phantom model through a sequence of `RecipeStep`s with `PhantomPOTrainer`: each step is a
`PhantomPOConfig` (its `training_stage` says which step of the recipe it is: 1, the language model frozen and the
projector + Phantom modules trained with Phantom Optimization; 2, everything trained with SFT), optionally its own
data and a LoRA adapter that is merged once the step ends. It resumes interrupted runs from complete checkpoints,
describes each step for the model card, and with `output_dir` saves the model, its processor and a card
(`trainer.save_trained_model`, which gathers a sharded model first).

`train_from_recipe` runs a recipe mapping, the form a YAML/JSON recipe file takes (`RECIPE_KEYS`; what
`phantom-hf train` reads): it builds the step configs, loads the dataset and the model, and calls `run_recipe`.
The demo (`phantom-hf demo`) and the examples call `run_recipe` directly.

This module imports the trainer (TRL, PEFT) only when a function needs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The keys a recipe mapping may hold (see `check_recipe`).
RECIPE_KEYS = frozenset(
    {
        "model", "dataset", "dataset_split", "image_root", "output_dir", "steps", "common", "step1", "step2",
        "lora", "card", "resume_from_checkpoint",
    }
)  # fmt: skip
# How each step is named in the model card unless a `RecipeStep` names it.
STEP_NAMES = {1: "step 1: projector + Phantom Dimension, PO", 2: "step 2: everything, SFT"}
DEFAULT_OUTPUT_DIR = "phantom-trained"


class RecipeError(ValueError):
    """A recipe that cannot run (unknown keys or fields, bad steps, a checkpoint or folder that cannot be used); the
    message names the key, field or path."""


@dataclass
class RecipeStep:
    """One step of the recipe.

    Attributes:
        config: the step's `PhantomPOConfig`; its `training_stage` is the recipe's step (1 or 2).
        train_dataset: the step's triples; None: the dataset given to `run_recipe`.
        name: the step's title in the model card; None: `STEP_NAMES[config.training_stage]`.
        lora: options of `phantom_lora_config` to train the step through a LoRA adapter (stage 2 only), merged into
            the model when the step ends; an empty mapping means the defaults; None: no adapter.
        eval_dataset: held-out triples; `PhantomPOTrainer.evaluate` scores them before and after the step
            (`StepResult.metrics_before` / `metrics_after`). None: no evaluation.
    """

    config: Any
    train_dataset: Any = None
    name: str | None = None
    lora: Mapping[str, Any] | None = None
    eval_dataset: Any = None


@dataclass
class StepResult:
    """What one step did: its trainer (state, log history), `Trainer.train`'s output, the names of the parameters it
    trained, its description for the model card, and with an `eval_dataset` the held-out metrics before and after."""

    step: RecipeStep
    name: str
    trainer: Any
    output: Any
    trainable: list[str]
    description: dict[str, Any]
    metrics_before: dict[str, float] | None = None
    metrics_after: dict[str, float] | None = None


@dataclass
class RecipeResult:
    """The trained model (LoRA adapters merged), the results of its steps, and the card's `training` section
    ({step name: hyper-parameters})."""

    model: Any
    steps: list[StepResult] = field(default_factory=list)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_dir: Path | None = None


# ----------------------------------------------------------------------------------------------- values


def parse_steps(value: Any) -> list[int]:
    """The recipe's `steps` (`"1,2"`, `[1, 2]`, `1`, ...) as a sorted list of 1 and/or 2, or a `RecipeError`."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        steps = [int(part) for part in parts]
    except (TypeError, ValueError) as error:
        raise RecipeError(f"steps must be 1, 2 or both, got {value!r}") from error
    if not steps or any(step not in (1, 2) for step in steps) or steps != sorted(set(steps)):
        raise RecipeError(f"steps must be 1, 2 or both, in order, got {value!r}")
    return steps


def resume_value(value: Any) -> bool | str | None:
    """A `resume_from_checkpoint` setting: None/False (start afresh), True (the last complete checkpoint) or a
    checkpoint folder."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "no")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes")):
        return True
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise RecipeError(f"resume_from_checkpoint must be true, false or a checkpoint folder, got {value!r}")


def check_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe mapping checked and completed: known keys only, a model and a dataset, `steps` parsed, the
    sections `common`/`step1`/`step2`/`card` as dicts, `resume_from_checkpoint` normalised, and defaults for
    `output_dir`, `dataset_split` and `image_root`."""
    recipe = dict(recipe)
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"unknown recipe keys {unknown}; known: {sorted(RECIPE_KEYS)}")
    for section in ("common", "step1", "step2", "card"):
        recipe[section] = dict(recipe.get(section) or {})
    recipe["resume_from_checkpoint"] = resume_value(recipe.get("resume_from_checkpoint"))
    if not recipe.get("model"):
        raise RecipeError("no model: pass --model (a saved Phantom folder or Hub id) or set `model` in the recipe")
    if not recipe.get("dataset"):
        raise RecipeError("no dataset: pass --dataset or set `dataset` in the recipe")
    recipe["steps"] = parse_steps(recipe.get("steps", [1, 2]))
    recipe.setdefault("output_dir", DEFAULT_OUTPUT_DIR)
    recipe.setdefault("dataset_split", None)
    recipe.setdefault("image_root", None)
    return recipe


def step_config(recipe: Mapping[str, Any], stage: int) -> Any:
    """The `PhantomPOConfig` of step `stage` of a checked recipe: its `common` fields, then its `step1`/`step2`
    fields. Checkpoints go to `OUTPUT_DIR-checkpoints/stepN`, next to the final folder, never inside it (the folder
    is what `push` uploads). `bf16` follows `PhantomPOConfig`'s rule (`trainer.bf16_default`)."""
    import torch

    from .trainer import PhantomPOConfig

    values = {**recipe["common"], **recipe[f"step{stage}"]}
    values.setdefault("output_dir", f"{recipe['output_dir']}-checkpoints/step{stage}")
    values["training_stage"] = stage
    # Pinned memory only helps copies to an accelerator; without one torch warns on every data loader.
    accelerator = getattr(torch, "accelerator", None)
    on_accelerator = accelerator.is_available() if accelerator else torch.cuda.is_available()
    values.setdefault("dataloader_pin_memory", on_accelerator)
    # Without an accelerator, processes started by `accelerate launch` train together only with `use_cpu`
    # (otherwise each builds a non-distributed state and trains alone).
    values.setdefault("use_cpu", not on_accelerator)
    fields = {config_field.name for config_field in dataclasses.fields(PhantomPOConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise RecipeError(f"step {stage}: unknown PhantomPOConfig fields {unknown}")
    return PhantomPOConfig(**values)


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Create `folder` if needed and write a probe file into it: a read-only or impossible destination is reported
    before training, not when the first checkpoint or the final model is saved."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise RecipeError(f"{what} {str(folder)!r} cannot be written: {' '.join(str(error).split())}") from error


def _resume_for_step(config: Any, wanted: bool | str | None, first: bool) -> bool | str | None:
    """What a step resumes from: its config's own `resume_from_checkpoint` when set; else the recipe's `wanted`:
    a given checkpoint for the first step run, and for every other step (or with `wanted=True`) the last complete
    checkpoint of the step's folder, or nothing (a fresh start) when it has none."""
    from .trainer import last_complete_checkpoint

    own = resume_value(getattr(config, "resume_from_checkpoint", None))
    if own is not None:
        return own
    if wanted is None:
        return None
    if isinstance(wanted, str) and first:
        return wanted
    return last_complete_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None


# ----------------------------------------------------------------------------------------------- running


def run_recipe(
    model: Any,
    processor: Any,
    steps: Sequence[RecipeStep],
    dataset: Any = None,
    *,
    resume_from_checkpoint: bool | str | None = None,
    output_dir: str | Path | None = None,
    card: Mapping[str, Any] | None = None,
    on_step_end: Callable[[StepResult], None] | None = None,
) -> RecipeResult:
    """Train `model` through `steps` in order with `PhantomPOTrainer`; returns the trained model and what each step did.

    Args:
        model: a `PhantomForConditionalGeneration`; trained in place (a LoRA step returns a merged copy, which the
            following steps train).
        processor: its `PhantomProcessor`.
        steps: the `RecipeStep`s to run.
        dataset: the triples of every step that has no `train_dataset` of its own.
        resume_from_checkpoint: None (every step starts afresh unless its config says otherwise), True (each step
            resumes from the last complete checkpoint of its `output_dir`, or starts afresh when there is none), or a
            checkpoint folder (the first step resumes from it, the others as with True).
        output_dir: where the trained model, its processor and (with `card`) its model card are saved; None: not
            saved.
        card: fields of the model card (`hub.render_model_card`); `training` is filled with the steps' descriptions
            and `base_model` defaults to the Hub id the model was loaded from. None: no card.
        on_step_end: called with each step's `StepResult` once the step has trained (and its adapter is merged).
    """
    from .hub import describe_training_args, infer_base_model
    from .trainer import PhantomPOTrainer, phantom_lora_config, save_trained_model

    result = RecipeResult(model=model)
    base_model = infer_base_model(model.config)
    wanted = resume_value(resume_from_checkpoint)
    for position, step in enumerate(steps):
        config = step.config
        data = step.train_dataset if step.train_dataset is not None else dataset
        if data is None:
            raise RecipeError(f"step {position + 1} ({step.name or config.training_stage}) has no training dataset")
        peft_config = phantom_lora_config(**step.lora) if step.lora is not None else None
        trainer = PhantomPOTrainer(
            model=model,
            args=config,
            train_dataset=data,
            eval_dataset=step.eval_dataset,
            processing_class=processor,
            peft_config=peft_config,
        )
        trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
        resume = _resume_for_step(config, wanted, first=position == 0)
        if resume is not None:
            print(f"step {config.training_stage}: resuming from {resume if isinstance(resume, str) else 'the last complete checkpoint'}")
        metrics_before = trainer.evaluate() if step.eval_dataset is not None else None
        output = trainer.train(resume_from_checkpoint=resume)
        metrics_after = trainer.evaluate() if step.eval_dataset is not None else None
        model = trainer.model
        if peft_config is not None:
            model = model.merge_and_unload()
        name = step.name or STEP_NAMES[config.training_stage]
        description = describe_training_args(config, po_weight=config.po_weight, training_loss=round(float(output.training_loss), 4))
        if step.lora is not None:
            description["lora"] = json.dumps(dict(step.lora)) if step.lora else "defaults"
        result.training[name] = description
        result.steps.append(StepResult(step, name, trainer, output, trainable, description, metrics_before, metrics_after))
        result.model = model
        if on_step_end is not None:
            on_step_end(result.steps[-1])
    if output_dir is not None:
        card_info = None if card is None else {"base_model": base_model, **card, "training": result.training}
        save_trained_model(result.model, processor, output_dir, card_info)  # every process: gathers a sharded model
        result.output_dir = Path(output_dir)
    return result


def _load_model_and_processor(source: str) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import phantom_hf  # noqa: F401  registers Phantom with the Auto classes

    model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True)
    return model, AutoProcessor.from_pretrained(source, trust_remote_code=True)


def train_from_recipe(
    recipe: Mapping[str, Any], load_model: Callable[[str], tuple[Any, Any]] | None = None
) -> RecipeResult:
    """Run a recipe mapping (see `check_recipe`; what `phantom-hf train` reads from a YAML/JSON file and its flags):
    every configuration, the checkpoint to resume from and the folders are checked before the dataset and the model
    are loaded; then `run_recipe` trains, and the model, its processor and its card go to `output_dir`.

    `load_model(source)` returns `(model, processor)` of the recipe's `model` (default: the Auto classes with
    `trust_remote_code=True`)."""
    from .data import load_triples
    from .trainer import checkpoint_problem

    recipe = check_recipe(recipe)
    configs = {stage: step_config(recipe, stage) for stage in recipe["steps"]}
    resume = recipe["resume_from_checkpoint"]
    if isinstance(resume, str):
        problem = checkpoint_problem(resume)
        if problem is not None:
            raise RecipeError(f"cannot resume from {resume}: {problem}")
    check_writable_folder(recipe["output_dir"], "the output folder")
    for config in configs.values():
        check_writable_folder(config.output_dir, "the checkpoint folder")
    try:
        dataset = load_triples(recipe["dataset"], recipe["dataset_split"], recipe["image_root"])
    except ValueError as error:  # a bad file, folder or split: the message names it
        raise RecipeError(str(error)) from error
    model, processor = (load_model or _load_model_and_processor)(recipe["model"])
    lora = recipe.get("lora")
    steps = [RecipeStep(config, lora=lora if stage == 2 else None) for stage, config in configs.items()]
    card = dict(recipe["card"])
    if Path(recipe["dataset"]).exists():
        card.setdefault("training_data", f"{len(dataset)} Phantom triples")
    else:
        card.setdefault("datasets", [recipe["dataset"]])
    return run_recipe(
        model, processor, steps, dataset, resume_from_checkpoint=resume, output_dir=recipe["output_dir"], card=card
    )


__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "RECIPE_KEYS",
    "STEP_NAMES",
    "RecipeError",
    "RecipeResult",
    "RecipeStep",
    "StepResult",
    "check_recipe",
    "check_writable_folder",
    "parse_steps",
    "resume_value",
    "run_recipe",
    "step_config",
    "train_from_recipe",
]
