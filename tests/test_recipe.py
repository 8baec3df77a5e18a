"""`recipe.run_recipe`, the one library function of the two-step recipe: it trains exactly as `PhantomPOTrainer` run
step by step (with and without a merged LoRA adapter in step 2), saves the folder it was asked to, and writes a
model card only when asked; a plain `save_pretrained` writes none."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from phantom_hf import PhantomForConditionalGeneration
from phantom_hf.hub import save_model_folder
from phantom_hf.recipe import STEP_NAMES, RecipeStep, run_recipe
from phantom_hf.trainer import PhantomPOTrainer, phantom_lora_config

from .test_trainer import color_triples, make_args, make_model, make_processor

LORA = {"r": 4, "lora_alpha": 8}


def step_by_step(tmp_path: Path, data, lora: dict | None) -> PhantomForConditionalGeneration:
    """The reference: one `PhantomPOTrainer` per step, the LoRA adapter of step 2 merged by hand."""
    model = make_model()
    for stage in (1, 2):
        peft_config = phantom_lora_config(**lora) if lora is not None and stage == 2 else None
        args = make_args(tmp_path, output_dir=str(tmp_path / f"reference{stage}"), training_stage=stage)
        trainer = PhantomPOTrainer(model, args, train_dataset=data, processing_class=make_processor(), peft_config=peft_config)
        trainer.train()
        model = trainer.model.merge_and_unload() if peft_config is not None else trainer.model
    return model


def assert_same_weights(one: torch.nn.Module, other: torch.nn.Module) -> None:
    mine, theirs = one.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[name], theirs[name]) for name in mine)


def test_recipe_trains_as_the_trainer_step_by_step_and_saves_with_a_card(tmp_path: Path) -> None:
    data = color_triples(8)
    expected = step_by_step(tmp_path, data, lora=None)
    steps = [RecipeStep(make_args(tmp_path, output_dir=str(tmp_path / f"step{stage}"), training_stage=stage)) for stage in (1, 2)]
    # resume=True with no checkpoint yet: every step starts afresh (a bare `Trainer.train(True)` would refuse)
    result = run_recipe(
        make_model(), make_processor(), steps, data, resume_from_checkpoint=True, output_dir=tmp_path / "out", card={"license": "mit"}
    )
    assert_same_weights(result.model, expected)
    assert_same_weights(PhantomForConditionalGeneration.from_pretrained(tmp_path / "out"), expected)
    # step 1: projector + Phantom modules; step 2: the language model too
    assert all("phantom" in name or "multi_modal_projector" in name for name in result.steps[0].trainable)
    assert any("mlp" in name for name in result.steps[1].trainable)
    card = (tmp_path / "out" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["license"] == "mit"
    assert STEP_NAMES[1] in card and STEP_NAMES[2] in card and "| po_weight | 1.0 |" in card


def test_recipe_merges_a_lora_step_as_peft_does(tmp_path: Path) -> None:
    data = color_triples(8)
    expected = step_by_step(tmp_path, data, lora=LORA)
    steps = [
        RecipeStep(make_args(tmp_path, output_dir=str(tmp_path / f"step{stage}"), training_stage=stage), lora=LORA if stage == 2 else None)
        for stage in (1, 2)
    ]
    result = run_recipe(make_model(), make_processor(), steps, data)
    assert_same_weights(result.model, expected)
    assert type(result.model) is PhantomForConditionalGeneration  # merged: no adapter left
    assert result.training[STEP_NAMES[2]]["lora"] == '{"r": 4, "lora_alpha": 8}'


def test_saving_writes_a_model_card_only_when_asked(tmp_path: Path) -> None:
    model, processor = make_model(), make_processor()
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").is_file() and not (tmp_path / "plain" / "README.md").exists()
    save_model_folder(tmp_path / "no-card", model, processor)
    assert not (tmp_path / "no-card" / "README.md").exists()
    save_model_folder(tmp_path / "card", model, processor, card={"model_name": "tiny"})
    assert "# tiny" in (tmp_path / "card" / "README.md").read_text()
