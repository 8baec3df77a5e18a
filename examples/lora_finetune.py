"""Step 2 of the Phantom recipe with LoRA: train, save the adapter, reload it with PEFT, merge, save a plain model.

1. A base Phantom model is saved to `OUT/base` (here a tiny random one built offline; with a real model this is
   the Hub id or folder you start from).
2. `PhantomPOTrainer` (`training_stage=2`, plain SFT) trains LoRA adapters on the language model's projections
   with `phantom_lora_config()`, which also trains the projector and the Phantom modules in full
   (`modules_to_save`), on Phantom triples held in a `datasets.Dataset` with an `Image` column.
3. The adapter is saved to `OUT/adapter` (adapter_config.json + adapter_model.safetensors: small).
4. It is reloaded onto a fresh copy of the base with `peft.PeftModel.from_pretrained`, merged with
   `merge_and_unload()`, and the merged model is saved to `OUT/merged`: a plain Phantom folder that loads with
   `AutoModelForImageTextToText.from_pretrained(OUT/merged, trust_remote_code=True)`, without peft.

The script prints the largest logit difference between the trained adapter model, the reloaded adapter, the
merged model and the merged folder (all ~1e-6: the same function), and against the base (training changed it).

For a real model, point `--base` at a converted folder (or a Hub id when online) and pass your own triples
(`phantom_hf.data.load_phantom_triples`); keep `PhantomPOConfig`'s defaults (learning rate 1e-5, cosine):

    python examples/lora_finetune.py --base path/to/phantom-1.8b --output-dir phantom-1.8b-lora
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from phantom_hf import PhantomForConditionalGeneration, PhantomProcessor  # noqa: E402
from phantom_hf.synthetic import generate_splits, to_dataset, vocabulary  # noqa: E402
from phantom_hf.tiny import tiny_phantom_config  # noqa: E402
from phantom_hf.tokenization import build_tokenizer  # noqa: E402
from phantom_hf.trainer import PhantomPOConfig, PhantomPOTrainer, phantom_lora_config  # noqa: E402


def save_tiny_base(folder: Path, seed: int = 0) -> None:
    """A tiny random Phantom model and its processor, saved to `folder` (stands in for a Hub checkpoint)."""
    tokenizer = build_tokenizer(vocabulary(), padding_side="right")
    config = tiny_phantom_config(
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        text_config={
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
    )
    torch.manual_seed(seed)
    PhantomForConditionalGeneration(config).save_pretrained(folder)
    PhantomProcessor.from_config(config, tokenizer, max_patches=1).save_pretrained(folder)


def logits_on(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base Phantom folder or Hub id (default: a tiny random one)")
    parser.add_argument("--output-dir", default=None, help="where base/, adapter/ and merged/ go (default: temp)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-3, help="the paper's 1e-5 is for real models")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r)")
    args = parser.parse_args()

    scratch = tempfile.TemporaryDirectory() if args.output_dir is None else None
    out = Path(args.output_dir or scratch.name)
    base = args.base
    if base is None:
        base = str(out / "base")
        save_tiny_base(Path(base))
        print(f"saved a tiny base model to {base}")

    model = AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
    tile = processor.tile_size
    train, held_out = generate_splits(args.num_images, 2, seed=0, image_size=tile)
    train_dataset = to_dataset(train)  # columns: images (a list of datasets.Image), prompt, chosen, rejected, ...
    print(f"training data: {train_dataset.num_rows} triples, features {dict(train_dataset.features)['images']}")

    config = PhantomPOConfig(
        output_dir=str(out / "checkpoints"),
        training_stage=2,  # everything trains (here: through LoRA), plain SFT
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        gradient_checkpointing=False,
        logging_steps=max(1, args.steps // 4),
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    lora = phantom_lora_config(r=args.rank, lora_alpha=2 * args.rank)
    trainer = PhantomPOTrainer(model, config, train_dataset=train_dataset, processing_class=processor, peft_config=lora)
    trainer.model.print_trainable_parameters()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"train loss: {losses[0]:.4f} -> {losses[-1]:.4f}")

    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    print(f"adapter saved to {adapter_dir}: {', '.join(sorted(p.name for p in adapter_dir.iterdir()))}")

    # Held-out prompts with their images, as the model sees them (chat template, image placeholders).
    prompts = [trainer.data_collator.format_prompt(example.prompt) for example in held_out]
    batch = processor(text=prompts, images=[[example.image] for example in held_out], padding=True, return_tensors="pt")
    batch = {key: value for key, value in batch.items() if key != "num_patches"}
    trained = logits_on(trainer.model, batch)

    base_model = AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True)
    base_logits = logits_on(base_model, batch)
    reloaded = PeftModel.from_pretrained(base_model, str(adapter_dir))
    reloaded_logits = logits_on(reloaded, batch)
    merged = reloaded.merge_and_unload()
    merged_logits = logits_on(merged, batch)
    merged_dir = out / "merged"
    merged.save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    from_folder = AutoModelForImageTextToText.from_pretrained(merged_dir, trust_remote_code=True)
    folder_logits = logits_on(from_folder, batch)
    print(f"merged model saved to {merged_dir} as {type(from_folder).__name__}")

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a - b).abs().max().item()

    print(f"max-abs-diff trained-adapter vs reloaded-adapter: {diff(trained, reloaded_logits):.3e}")
    print(f"max-abs-diff reloaded-adapter vs merged: {diff(reloaded_logits, merged_logits):.3e}")
    print(f"max-abs-diff merged vs merged-folder: {diff(merged_logits, folder_logits):.3e}")
    print(f"max-abs-diff base vs merged: {diff(base_logits, merged_logits):.3e}")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
