"""Phantom's two-step recipe on a tiny model and the synthetic shapes task, offline on a CPU.

Step 1: the language model frozen, the projector and the Phantom modules trained with Phantom Optimization
(SimPO + SFT, Eq. 4). Step 2: everything trained with plain SFT. Prints the held-out chosen-over-rejected
reward accuracy before and after step 1, and saves the final model and processor.

    python examples/train_po.py --output-dir /tmp/phantom-po
    accelerate launch --num_processes 2 --cpu examples/train_po.py --stage 1 --steps 8 --save-steps 4

Real models take the same code path: load a Phantom checkpoint and its `PhantomProcessor`, pass a dataset
of triples (`phantom_hf.data.load_phantom_triples`), and keep the paper's defaults of `PhantomPOConfig`.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from phantom_hf import PhantomForConditionalGeneration  # noqa: E402
from phantom_hf.modeling.processing_phantom import PhantomProcessor  # noqa: E402
from phantom_hf.recipe import RecipeStep, StepResult, run_recipe  # noqa: E402
from phantom_hf.synthetic import generate_splits, to_dataset, vocabulary  # noqa: E402
from phantom_hf.tiny import tiny_phantom_config  # noqa: E402
from phantom_hf.tokenization import build_tokenizer  # noqa: E402
from phantom_hf.trainer import PhantomPOConfig  # noqa: E402


def build(seed: int = 0) -> tuple[PhantomForConditionalGeneration, PhantomProcessor]:
    """A tiny Phantom model (28 px tiles, 4 vision tokens per tile) and its processor, built offline."""
    tokenizer = build_tokenizer(vocabulary(), padding_side="right")
    config = tiny_phantom_config(
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), text_config={"vocab_size": len(tokenizer)}
    )
    torch.manual_seed(seed)
    return PhantomForConditionalGeneration(config), PhantomProcessor.from_config(config, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="phantom-po-tiny")
    parser.add_argument("--stage", choices=["1", "2", "both"], default="both")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per stage")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    parser.add_argument("--resume-from-checkpoint", default=None)
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="the paper's 1e-5 is for real models")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluations")
    args = parser.parse_args()

    model, processor = build()
    train, held_out = generate_splits(args.num_images, max(4, args.num_images // 4), seed=0, image_size=28, kinds=("color",))
    train, held_out = to_dataset(train), to_dataset(held_out)
    stages = [1, 2] if args.stage == "both" else [int(args.stage)]
    steps = [
        RecipeStep(
            PhantomPOConfig(
                output_dir=os.path.join(args.output_dir, f"stage{stage}"),
                training_stage=stage,
                max_steps=args.steps,
                per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                logging_steps=1,
                save_strategy="steps" if args.save_steps else "no",
                save_steps=args.save_steps or 500,
                bf16=False,
                use_cpu=not torch.cuda.is_available(),
                report_to=[],
                seed=0,
            ),
            eval_dataset=None if args.no_eval else held_out,
        )
        for stage in stages
    ]
    run_recipe(model, processor, steps, train, resume_from_checkpoint=args.resume_from_checkpoint, on_step_end=report)


def report(step: StepResult) -> None:
    """Print what the step learned (on the main process) and save the step's model to OUTPUT_DIR/stageN/final."""
    trainer, config = step.trainer, step.step.config
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        line = f"stage {config.training_stage} ({'PO' if config.po_weight else 'SFT'}): final train loss {logged[-1]['loss']:.6f}"
        rewarded = [entry for entry in logged if "rewards/accuracies" in entry]  # SFT-only steps log no rewards
        if rewarded:
            window = max(1, len(rewarded) // 4)
            accuracy = [sum(entry["rewards/accuracies"] for entry in part) / len(part) for part in (rewarded[:window], rewarded[-window:])]
            line += f"; train reward accuracy {accuracy[0]:.3f} (first {window} steps) -> {accuracy[1]:.3f} (last {window})"
        before, after = step.metrics_before, step.metrics_after
        if after is not None:
            line += (
                f"; held-out reward accuracy {before['eval_rewards/accuracies']:.3f} -> "
                f"{after['eval_rewards/accuracies']:.3f}, nll {before['eval_nll_loss']:.3f} -> {after['eval_nll_loss']:.3f}"
            )
        print(line)
    trainer.save_model(os.path.join(config.output_dir, "final"))

if __name__ == "__main__":
    main()
