"""One short `PhantomPOTrainer` run for tests/test_distributed.py: run as is (one process) or under
`accelerate launch` / `torchrun` (several). Every process writes `rank{N}.json` into `--output-dir`: the logged
losses and the tiles each vision-tower call encoded; the final model (or adapter) goes to `--output-dir/final`.

Every triple has the same prompt and one-token answers, so each process's token-averaged SFT term weighs its
rows as the single-process run over the whole global batch does: the losses and updates can be compared exactly.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from datasets import Dataset, Image, List, disable_progress_bars  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from torch.distributed.fsdp import FSDPModule  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from phantom_hf import PhantomForConditionalGeneration  # noqa: E402
from phantom_hf.modeling.processing_phantom import PhantomProcessor  # noqa: E402
from phantom_hf.tiny import tiny_phantom_config  # noqa: E402
from phantom_hf.tokenization import build_tokenizer  # noqa: E402
from phantom_hf.trainer import PhantomPOConfig, PhantomPOTrainer, phantom_lora_config, save_trained_model  # noqa: E402

WORDS = ["red", "blue", "color", "?"]
COLORS = {"red": (220, 30, 30), "blue": (30, 70, 220)}


def build(seed: int = 0) -> tuple[PhantomForConditionalGeneration, PhantomProcessor]:
    """The tiny model (eta = 1, Phantom weights large enough to matter) and its processor, seeded."""
    tokenizer = build_tokenizer(WORDS, padding_side="right")
    config = tiny_phantom_config(image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), phantom_eta=1.0)
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = PhantomForConditionalGeneration(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "phantom" in name:
                parameter.normal_(0, 0.5)
    return model, PhantomProcessor.from_config(config, tokenizer)


def triples(n: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(n):
        color = ["red", "blue"][index % 2]
        shade = tuple(int(c) for c in torch.tensor(COLORS[color]) + torch.randint(-20, 20, (3,), generator=generator))
        rows.append(
            {
                "images": [PILImage.new("RGB", (28, 28), shade)],
                "prompt": "<image> color ?",
                "chosen": color,
                "rejected": "blue" if color == "red" else "red",
            }
        )
    return Dataset.from_list(rows).cast_column("images", List(Image()))


class GradientNames(TrainerCallback):
    """Names of the parameters that hold a gradient when the optimizer steps (the first step)."""

    def __init__(self) -> None:
        self.names: list[str] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if self.names is None:
            self.names = sorted(name for name, parameter in model.named_parameters() if parameter.grad is not None)


def run(output_dir: str, world: int, stage: int = 1, lora: bool = False, gradient_checkpointing: bool = True,
        steps: int = 3, global_batch: int = 4, save_steps: int = 0, resume_from_checkpoint: str | None = None) -> None:
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    model, processor = build()
    tiles: list[int] = []
    model.model.vision_tower.register_forward_pre_hook(
        lambda module, inputs, kwargs: tiles.append(int(kwargs["pixel_values"].shape[0])), with_kwargs=True
    )
    config = PhantomPOConfig(
        output_dir=output_dir,
        training_stage=stage,
        max_steps=steps,
        per_device_train_batch_size=global_batch // world,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        gradient_checkpointing=gradient_checkpointing,
        bf16=False,
        # DeepSpeed on CPU: accelerate needs the gloo backend named (it derives none for a CPU device) and no use_cpu
        use_cpu=not deepspeed,
        ddp_backend="gloo" if deepspeed else None,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    gradients = GradientNames()
    trainer = PhantomPOTrainer(
        model,
        config,
        train_dataset=triples(steps * global_batch),
        processing_class=processor,
        peft_config=phantom_lora_config(r=4) if lora else None,
        callbacks=[gradients],
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(os.path.join(output_dir, "final"))
    save_trained_model(trainer.model, processor, os.path.join(output_dir, "saved"))
    refused = None
    try:  # the next step of the recipe on the model this trainer sharded (accelerate allows one DeepSpeed trainer)
        if not deepspeed:
            PhantomPOTrainer(trainer.model, config, train_dataset=trainer.train_dataset, processing_class=processor)
    except (TypeError, ValueError) as error:
        refused = str(error)
    report = {
        "losses": {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry},
        "tiles": tiles,
        "gradients": gradients.names,
        "refused": refused,
        "units": sorted(
            type(module).__name__.removeprefix("FSDP") for module in trainer.model.modules() if isinstance(module, FSDPModule)
        ),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_version": getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", None),
    }
    with open(os.path.join(output_dir, f"rank{trainer.accelerator.process_index}.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--runs", required=True, help="JSON: {name: keyword arguments of run()}, run in order")
    args = parser.parse_args()
    disable_progress_bars()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name, options in json.loads(args.runs).items():
        run(os.path.join(args.output_dir, name), world, **options)


if __name__ == "__main__":
    main()
