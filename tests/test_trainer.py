"""PhantomPOTrainer: Eq. 4 against an independent computation, the two stages' freezing, learning, the vision
tower running once per triple, PEFT round trips and a two-process run with resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, Image, List, disable_progress_bars
from PIL import Image as PILImage

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from phantom_hf import PhantomForConditionalGeneration  # noqa: E402
from phantom_hf.modeling.processing_phantom import PhantomProcessor  # noqa: E402
from phantom_hf.tiny import tiny_phantom_config  # noqa: E402
from phantom_hf.tokenization import build_tokenizer  # noqa: E402
from phantom_hf.trainer import (  # noqa: E402
    PhantomPOCollator,
    PhantomPOConfig,
    PhantomPOTrainer,
    apply_training_stage,
    phantom_lora_config,
)

disable_progress_bars()
REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "what", "color", "is", "it", "the", "image", "?", "a", "bright", "dark", "say", "word"]
COLORS = {"red": (220, 30, 30), "blue": (30, 70, 220)}


def make_tokenizer():
    return build_tokenizer(WORDS, padding_side="right")


IMAGE_TOKEN_ID = make_tokenizer().convert_tokens_to_ids("<IMG_CONTEXT>")


def make_processor(chat_template: str | None = None) -> PhantomProcessor:
    """The real processor on 28x28 tiles (the tiny vision tower's image size): one tile per 28x28 image."""
    config = tiny_phantom_config(image_token_id=IMAGE_TOKEN_ID)
    return PhantomProcessor.from_config(config, make_tokenizer(), chat_template=chat_template)


def make_model(seed: int = 0, **overrides) -> PhantomForConditionalGeneration:
    torch.manual_seed(seed)
    config = tiny_phantom_config(image_token_id=IMAGE_TOKEN_ID, **overrides)
    config.text_config.pad_token_id = 0
    return PhantomForConditionalGeneration(config)


def color_triples(n: int, seed: int = 0, text_only_every: int = 0) -> Dataset:
    """Triples whose answer is the image's colour; every `text_only_every`-th row is text-only."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(n):
        if text_only_every and index % text_only_every == text_only_every - 1:
            rows.append({"images": [], "prompt": "say a word", "chosen": "bright word", "rejected": "dark"})
            continue
        color = ["red", "blue"][index % 2]
        other = "blue" if color == "red" else "red"
        shade = tuple(int(c) for c in (torch.tensor(COLORS[color]) + torch.randint(-20, 20, (3,), generator=generator)))
        image = PILImage.new("RGB", (28, 28), shade)
        long = index % 3 == 0
        rows.append(
            {
                "images": [image],
                "prompt": "<image> what color is the image ?" if long else "<image> color ?",
                "chosen": f"it is {color}" if long else color,
                "rejected": f"it is {other}" if long else other,
            }
        )
    return Dataset.from_list(rows).cast_column("images", List(Image()))


def make_args(tmp_path: Path, **overrides) -> PhantomPOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    values.update(overrides)
    return PhantomPOConfig(**values)


def row_terms(model, input_ids, attention_mask, labels, pixel_values):
    """Per-row summed answer log-prob, answer length and summed token cross-entropy from one plain forward."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits.float()
    logits, targets = logits[:, :-1], labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return logp.sum(-1), mask.sum(-1)


def test_loss_equals_eq4_from_two_plain_forwards(tmp_path):
    model = make_model()
    processor = make_processor()
    data = color_triples(6, text_only_every=3)
    trainer = PhantomPOTrainer(model, make_args(tmp_path), train_dataset=data, processing_class=processor)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    assert batch["pixel_values"].shape[0] == 4  # two of the six rows are text-only
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)

        # Independently: chosen and rejected each through a plain forward with their own pixel_values.
        sums, lengths = {}, {}
        for kind in ("chosen", "rejected"):
            sums[kind], lengths[kind] = row_terms(
                model, batch[f"{kind}_input_ids"], batch[f"{kind}_attention_mask"], batch[f"{kind}_labels"], batch["pixel_values"]
            )
        beta, gamma = 2.0, 0.5
        sft = -sums["chosen"].sum() / lengths["chosen"].sum()  # mean token cross-entropy of the chosen answers
        margin = beta * sums["chosen"] / lengths["chosen"] - beta * sums["rejected"] / lengths["rejected"] - gamma
        expected = sft - F.logsigmoid(margin).mean()
    assert lengths["chosen"].tolist() != [lengths["chosen"][0].item()] * 6  # answers of several lengths
    assert abs(loss.item() - expected.item()) < 1e-5, (loss.item(), expected.item())


def test_po_weight_zero_in_stage_two_is_sft_only(tmp_path):
    model = make_model()
    data = color_triples(4)
    trainer = PhantomPOTrainer(model, make_args(tmp_path, training_stage=2), train_dataset=data, processing_class=make_processor())
    assert trainer.args.po_weight == 0.0 and trainer.args.freeze_vision_tower is False
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        out = model(
            input_ids=batch["chosen_input_ids"],
            attention_mask=batch["chosen_attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["chosen_labels"],
        )
    assert abs(loss.item() - out.loss.item()) < 1e-5


def test_bf16_default_follows_the_machine():
    """TRL's CPO turns bf16 on everywhere, which transformers refuses without a bf16 accelerator."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    assert PhantomPOConfig(output_dir="unused").bf16 is (is_torch_bf16_gpu_available() or is_torch_xla_available())
    assert PhantomPOConfig(output_dir="unused", use_cpu=True).bf16 is False
    assert PhantomPOConfig(output_dir="unused", bf16=False).bf16 is False


def test_paper_defaults():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # neither checkpointing name warns, on any supported release
        args = PhantomPOConfig(output_dir="unused", bf16=False)
        assert PhantomPOConfig(output_dir="unused", bf16=False, gradient_checkpointing=False).gradient_checkpointing is False
    assert getattr(args, "activation_checkpointing", True) is True
    assert (args.loss_type, args.beta, args.simpo_gamma, args.cpo_alpha) == ("simpo", 2.0, 0.5, 1.0)
    assert args.learning_rate == 1e-5 and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert str(args.lr_scheduler_type.value) == "cosine_with_min_lr"
    assert args.gradient_checkpointing and args.optim.value.startswith("adamw")
    assert args.po_weight == 1.0 and args.freeze_vision_tower is True and args.training_stage == 1
    with pytest.raises(ValueError, match="training_stage"):
        PhantomPOConfig(output_dir="unused", bf16=False, training_stage=3)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        PhantomPOConfig(output_dir="unused", bf16=False, remove_unused_columns=True)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _changed(before, model) -> set[str]:
    after = model.state_dict()
    return {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}


def test_stage_one_trains_only_projector_and_phantom_stage_two_trains_the_llm(tmp_path):
    data = color_triples(12)
    model = make_model(phantom_eta=1.0)
    with torch.no_grad():  # eta = 1 and large Phantom weights, so that every Phantom weight gets a visible gradient
        for name, parameter in model.named_parameters():
            if "phantom" in name:
                parameter.normal_(0, 0.5)
    before = _snapshot(model)
    PhantomPOTrainer(model, make_args(tmp_path), train_dataset=data, processing_class=make_processor()).train()
    changed = _changed(before, model)
    projector_or_phantom = {name for name in before if "multi_modal_projector" in name or "phantom" in name}
    assert changed == projector_or_phantom  # every one of them moved, nothing else did (bit-identical LLM and tower)

    model = make_model()
    before = _snapshot(model)
    args = make_args(tmp_path, training_stage=2, freeze_vision_tower=True, freeze_parameters=[r"layers\.1\.mlp"])
    PhantomPOTrainer(model, args, train_dataset=data, processing_class=make_processor()).train()
    changed = _changed(before, model)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.language_model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert not any("vision_tower" in name or "layers.1.mlp" in name for name in changed)


def test_apply_training_stage_validates():
    model = make_model()
    with pytest.raises(ValueError, match="training_stage"):
        apply_training_stage(model, 0)
    with pytest.raises(ValueError, match="no parameter"):
        apply_training_stage(model, 1, freeze_parameters=["."])


def test_sft_only_training_runs_chosen_rows_only_with_cpo_loss_and_gradients(tmp_path):
    """With po_weight=0 a training step skips the rejected rows; loss and gradients equal CPO's full pass."""
    model = make_model()
    data = color_triples(6, text_only_every=3)
    trainer = PhantomPOTrainer(model, make_args(tmp_path, training_stage=2), train_dataset=data, processing_class=make_processor())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    rows = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )

    def loss_and_grads(train_eval):
        model.zero_grad()
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval=train_eval)
        loss.backward()
        return loss.item(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sft_loss, sft_metrics, sft_grads = loss_and_grads("train")
    full_loss, full_metrics, full_grads = loss_and_grads("eval")  # evaluation keeps CPO's chosen + rejected pass
    assert rows == [6, 12]
    assert abs(sft_loss - full_loss) < 1e-6 and abs(sft_metrics["nll_loss"] - full_metrics["eval_nll_loss"]) < 1e-6
    assert abs(sft_metrics["logps/chosen"] - full_metrics["eval_logps/chosen"]) < 1e-6
    assert sft_grads.keys() == full_grads.keys() and len(sft_grads) > 10
    for name, grad in sft_grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_vision_tower_runs_once_per_triple(tmp_path):
    model = make_model()
    calls = []
    model.model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    data = color_triples(8, text_only_every=4)  # 6 images
    args = make_args(tmp_path, max_steps=2, training_stage=2)  # tower trainable and gradient-checkpointed
    PhantomPOTrainer(model, args, train_dataset=data, processing_class=make_processor()).train()
    assert len(calls) == 2 and sum(calls) == 6  # one call per step, each triple's image encoded once


def test_reward_accuracy_rises_above_chance(tmp_path):
    train, held_out = color_triples(64, seed=1), color_triples(32, seed=2)
    args = make_args(
        tmp_path, max_steps=150, per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
        per_device_eval_batch_size=16, gradient_checkpointing=False,
    )
    trainer = PhantomPOTrainer(make_model(), args, train_dataset=train, eval_dataset=held_out, processing_class=make_processor())
    before = trainer.evaluate()["eval_rewards/accuracies"]
    trainer.train()
    after = trainer.evaluate()["eval_rewards/accuracies"]
    print(f"held-out reward accuracy: {before:.3f} -> {after:.3f}")
    assert before <= 0.7 and after >= 0.9
    history = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    assert {"rewards/margins", "logps/chosen", "logps/rejected", "nll_loss"} <= set(history[-1])


def test_lora_adapter_reloads_and_merges_into_a_plain_phantom_checkpoint(tmp_path):
    from peft import PeftModel

    data = color_triples(8)
    args = make_args(tmp_path, training_stage=2, max_steps=3)
    trainer = PhantomPOTrainer(
        make_model(), args, train_dataset=data, processing_class=make_processor(), peft_config=phantom_lora_config(r=4)
    )
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable) and any("modules_to_save" in name and "phantom" in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))

    batch = trainer.data_collator([data[i] for i in range(4)])
    inputs = dict(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"], pixel_values=batch["pixel_values"])
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        reloaded = PeftModel.from_pretrained(make_model(), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-6)
        base_logits = make_model().eval()(**inputs).logits
        assert not torch.allclose(base_logits, expected, atol=1e-4)  # the adapter matters

        merged = reloaded.merge_and_unload()
        assert type(merged) is PhantomForConditionalGeneration
        merged.save_pretrained(tmp_path / "merged")
        plain = PhantomForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
        assert not any("lora" in name or "modules_to_save" in name for name in plain.state_dict())
        torch.testing.assert_close(plain(**inputs).logits, expected, rtol=0, atol=1e-5)


def test_peft_in_stage_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="training_stage=2"):
        PhantomPOTrainer(
            make_model(), make_args(tmp_path), train_dataset=color_triples(4), processing_class=make_processor(),
            peft_config=phantom_lora_config(),
        )


def test_invalid_triples_are_reported_and_skipped_or_refused(tmp_path):
    rows = color_triples(4).to_list()
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[2]["chosen"] = "  "
    data = Dataset.from_list(rows).cast_column("images", List(Image()))
    trainer = PhantomPOTrainer(make_model(), make_args(tmp_path), train_dataset=data, processing_class=make_processor())
    assert len(trainer.train_dataset) == 2
    assert [(p.index, p.reason) for p in trainer.invalid_triples["train"]] == [(1, "chosen equals rejected"), (2, "empty chosen answer")]
    with pytest.raises(ValueError, match="row 1: chosen equals rejected"):
        PhantomPOTrainer(
            make_model(), make_args(tmp_path, invalid_triples="raise"), train_dataset=data, processing_class=make_processor()
        )


def test_collator_pads_right_and_masks_prompts():
    processor = make_processor()
    collator = PhantomPOCollator(processor, apply_chat_template=False)
    rows = color_triples(3).to_list()
    batch = collator(rows)
    tokenizer = processor.tokenizer
    for row_index, row in enumerate(rows):
        ids = batch["chosen_input_ids"][row_index][batch["chosen_attention_mask"][row_index].bool()].tolist()
        labels = batch["chosen_labels"][row_index]
        answer = labels[labels != -100].tolist()
        assert answer == tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[-len(answer):] == answer and (ids.count(IMAGE_TOKEN_ID) == 4)
        length = len(ids)
        assert batch["chosen_attention_mask"][row_index, :length].all() and not batch["chosen_attention_mask"][row_index, length:].any()
    with pytest.raises(ValueError, match="no room"):
        PhantomPOCollator(processor, max_length=5, apply_chat_template=False)(rows)
    with pytest.raises(TypeError, match="PhantomProcessor"):
        PhantomPOCollator(processor.tokenizer)


def _launch(tmp_path: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(REPO / "examples" / "train_po.py"), "--output-dir", str(output_dir), "--stage", "1", "--steps", "6",
        "--save-steps", "3", "--batch-size", "2", "--num-images", "16", "--no-eval", *extra,
    ]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_two_process_ddp_run_saves_and_resumes_to_the_same_loss(tmp_path):
    first = tmp_path / "first"
    _launch(tmp_path, first)
    assert (first / "stage1" / "final" / "model.safetensors").is_file()
    assert (first / "stage1" / "final" / "processor_config.json").is_file()
    uninterrupted = _losses(first / "stage1" / "checkpoint-6")
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]

    second = tmp_path / "second"
    _launch(tmp_path, second, "--resume-from-checkpoint", str(first / "stage1" / "checkpoint-3"))
    resumed = _losses(second / "stage1" / "checkpoint-6")
    assert abs(resumed[6] - uninterrupted[6]) < 1e-6, (resumed, uninterrupted)
    assert abs(resumed[4] - uninterrupted[4]) < 1e-6
