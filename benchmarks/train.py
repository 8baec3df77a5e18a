"""One Phantom Optimization training step (forward + backward + optimizer step) of `PhantomPOTrainer`, stage 1
and stage 2: the shared vision pass against a naive one that encodes each image twice.

Variants, on one random-weight model (the same tensors for all of them), one batch of triples with one image
(one 448-px tile) each:
  shared  `PhantomPOTrainer` as it is: the vision tower and projector run once per triple; the tiles are passed
          once, with `image_tile_index` giving them to the rejected rows too (`concatenated_forward`);
  naive   the same trainer with `concatenated_forward` passing `pixel_values` twice (chosen half, then rejected
          half), so the tower and projector encode every image twice: the baseline of the ratio column;
  vision  not a training step: the vision pass alone, `get_image_features` on the batch's tiles and its
          backward, on the trainer's model as the trainer left it (train mode, activation checkpointing, the
          input-gradient hooks TRL and transformers add): the work the naive step does twice, the shared once;
  sft     stage 2 only: the trainer with stage 2's default `po_weight=0` (plain SFT), whose training steps run the
          chosen rows only (no rejected rows, so nothing to share). shared and naive keep the preference term
          (`po_weight=1`) in both stages, so that stage 2 measures what sharing saves when PO is kept there.

A step is what the trainer's loop does per batch, minus data loading and logging: `training_step` (forward,
CPO/SimPO loss, backward), gradient clipping, optimizer step (fused AdamW), scheduler step, `zero_grad`. Both
trainers are set up by `trainer.train()` for one step (activation checkpointing, optimizer, scheduler: the
trainer's own set-up); that step is not measured. Before timing, the script asserts that both variants compute
the same loss on the batch and that the naive one runs the tower on twice as many tiles.

Expected: the shared step saves one vision pass, so naive/shared step time ~ 1 / (1 - vision share of the
naive step); the summary line prints both. Peak memory is measured after the timing, one step per variant, as
the peak of the bytes allocated above those allocated before the step: on CUDA from
`torch.cuda.max_memory_allocated`, on the CPU from torch.profiler's allocation events (`profile_memory=True`;
the resident set size would mostly show what glibc keeps cached). The weights and the optimizer state exist
before the step and are not counted; gradients, activations and temporaries are.

Default shape (CPU-sized, vision-heavy): one InternViT-300M layer on 448-px tiles (1025 tokens, 256 after
pixel shuffle) and a 2-layer Qwen2 decoder (hidden 512, vocabulary 1024), 2 triples per step: the vision pass
is ~40% of the naive step, and a stage takes ~1.5 min on one CPU thread. On a GPU try
`--preset phantom-0.5b` (the full InternViT-300M and Qwen2-0.5B unless --vision-layers / shape flags say
otherwise).

    python benchmarks/train.py --threads 1 --clock process --json train.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, Image, List, disable_progress_bars  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Row,
    Timer,
    add_model_arguments,
    attn_implementations,
    format_table,
    interleaved,
    machine_info,
    report,
    setup_runtime,
    shape_label,
    text_config_from_args,
)
from phantom_hf import PhantomConfig, PhantomForConditionalGeneration  # noqa: E402
from phantom_hf.modeling.presets_phantom import INTERNVIT_300M_448PX  # noqa: E402
from phantom_hf.modeling.processing_phantom import PhantomProcessor  # noqa: E402
from phantom_hf.tokenization import build_tokenizer  # noqa: E402

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    from trl.experimental.cpo import CPOTrainer  # noqa: E402

from phantom_hf.trainer import PhantomPOConfig, PhantomPOTrainer  # noqa: E402

BASELINE = "naive"
# training-step variants per stage -> po_weight
STEP_VARIANTS = {1: {"naive": 1.0, "shared": 1.0}, 2: {"naive": 1.0, "shared": 1.0, "sft": 0.0}}
WORDS = [f"w{index}" for index in range(200)]
# The tiny decoder of the default shape: cheap next to the vision tower, so the vision share is plain to see.
TINY_TEXT_DEFAULTS = dict(layers=2, hidden_size=512, heads=8, kv_heads=2, head_dim=64, intermediate_size=1536)
TINY_VOCAB_SIZE = 1024  # without --preset and --vocab-size
DEFAULT_VISION_LAYERS = 1


class NaivePOTrainer(PhantomPOTrainer):
    """`PhantomPOTrainer` without the shared vision pass: the model gets `pixel_values` once for the chosen rows
    and once more for the rejected rows (CPO stacks chosen rows, then rejected rows), so the vision tower and
    the projector encode each image twice. The baseline of this benchmark, not for training."""

    def concatenated_forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple:
        pixel_values = batch.get("pixel_values")
        if pixel_values is None:
            return CPOTrainer.concatenated_forward(self, model, batch)
        doubled = torch.cat([pixel_values, pixel_values])
        return CPOTrainer.concatenated_forward(self, functools.partial(model, pixel_values=doubled), batch)


def phantom_config(args: argparse.Namespace, image_token_id: int, attn_implementation: str) -> PhantomConfig:
    """The benchmark model's config: the flag/preset decoder, InternViT-300M-448px with --vision-layers layers."""
    text = text_config_from_args(args)
    text.pad_token_id = 0
    vision = dict(INTERNVIT_300M_448PX)
    if args.vision_layers:
        vision["num_hidden_layers"] = args.vision_layers
    elif not args.preset:
        vision["num_hidden_layers"] = DEFAULT_VISION_LAYERS
    config = PhantomConfig(text_config=text.to_dict(), vision_config=vision, image_token_id=image_token_id)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    return config


def triples(count: int, prompt_words: int, answer_words: int, image_size: int, seed: int) -> Dataset:
    """`count` triples of one random-noise image, a prompt and two different answers of `answer_words` words."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        words = rng.choice(WORDS, prompt_words + 2 * answer_words).tolist()
        chosen, rejected = words[prompt_words : prompt_words + answer_words], words[prompt_words + answer_words :]
        rejected[0] = "w0" if chosen[0] != "w0" else "w1"  # never equal to chosen
        rows.append(
            {
                "images": [PILImage.fromarray(pixels)],
                "prompt": "<image>\n" + " ".join(words[:prompt_words]),
                "chosen": " ".join(chosen),
                "rejected": " ".join(rejected),
            }
        )
    return Dataset.from_list(rows).cast_column("images", List(Image()))


def po_step(trainer: PhantomPOTrainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One step of the trainer's loop on a collated batch: forward + loss + backward, clipping, optimizer and
    scheduler steps, zero_grad. Returns the (detached) loss."""
    model = trainer.model_wrapped
    loss = trainer.training_step(model, batch)
    if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return loss


def vision_pass(model: PhantomForConditionalGeneration, pixel_values: torch.Tensor, grad: torch.Tensor) -> None:
    """The vision tower + projector on `pixel_values` as in a training step (train mode, the trainer's
    checkpointing and hooks) and their backward as autograd runs it there; gradients are then dropped."""
    model.train()
    features = model.get_image_features(pixel_values)
    if features.requires_grad:
        features.backward(grad)
    model.zero_grad()


def _cpu_peak_bytes(prof: profile) -> int:
    """Peak of the bytes allocated by torch's CPU allocator during a profiled region, above its start: the running
    sum of the profiler's allocation events (frees are negative) in time order."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def peak_step_mib(step: Any, device: torch.device) -> float:
    """MiB that one call of `step()` allocates at its peak above what was allocated before it: CUDA's peak
    allocation statistics, or on the CPU the allocation events of torch.profiler (`profile_memory=True`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return _cpu_peak_bytes(prof) / 2**20


def check_same_loss(
    trainers: dict[str, PhantomPOTrainer], batch: dict[str, torch.Tensor], model: Any, dtype: str
) -> dict[str, float]:
    """Correctness guard: the shared and naive losses on the batch agree, and the naive step encodes twice the tiles."""
    tiles: dict[str, list[int]] = {}
    losses: dict[str, float] = {}
    for name in ("shared", "naive"):
        trainer = trainers[name]
        calls: list[int] = []
        hook = model.model.vision_tower.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
        )
        try:
            model.eval()
            with torch.no_grad():
                losses[name] = trainer.compute_loss(trainer.model_wrapped, batch).item()
        finally:
            hook.remove()
        tiles[name] = calls
    n_tiles = batch["pixel_values"].shape[0]
    if tiles["shared"] != [n_tiles] or tiles["naive"] != [2 * n_tiles]:
        raise AssertionError(
            f"vision tower calls (tiles per call): {tiles}; expected shared [{n_tiles}], naive [{2 * n_tiles}]"
        )
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    if abs(losses["shared"] - losses["naive"]) > tolerance * max(1.0, abs(losses["naive"])):
        raise AssertionError(f"shared and naive losses differ: {losses}")
    return losses


def run_stage(
    stage: int,
    model: PhantomForConditionalGeneration,
    processor: PhantomProcessor,
    data: Dataset,
    args: argparse.Namespace,
    workdir: str,
    device: torch.device,
) -> list[Row]:
    """Set up both trainers for `stage` on `model`, check the losses, time the variants interleaved, measure memory."""
    trainers: dict[str, PhantomPOTrainer] = {}
    variants = STEP_VARIANTS[stage]
    for name, po_weight in variants.items():
        trainer_class = NaivePOTrainer if name == "naive" else PhantomPOTrainer
        po_args = PhantomPOConfig(
            output_dir=os.path.join(workdir, f"stage{stage}-{name}"),
            training_stage=stage,
            po_weight=po_weight,
            per_device_train_batch_size=args.batch,
            max_steps=1,
            bf16=False,
            use_cpu=device.type == "cpu",
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        trainer = trainer_class(model, po_args, train_dataset=data, processing_class=processor)
        trainer.remove_callback(PrinterCallback)
        trainer.train()  # the trainer's own set-up (checkpointing, optimizer, scheduler) and one unmeasured step
        trainers[name] = trainer
    batch = trainers["shared"].data_collator([trainers["shared"].train_dataset[i] for i in range(args.batch)])
    batch = {key: value.to(device) for key, value in batch.items()}
    losses = check_same_loss(trainers, batch, model, args.dtype)
    setting = f"stage {stage} b{args.batch}"
    print(f"{setting}: loss shared {losses['shared']:.6f}, naive {losses['naive']:.6f} (checked equal)", flush=True)

    pixel_values = batch["pixel_values"]
    with torch.no_grad():
        grad = torch.randn_like(model.get_image_features(pixel_values))

    def run(name: str) -> dict[str, float]:
        with Timer(device) as timer:
            if name == "vision":
                vision_pass(model, pixel_values, grad)
            else:
                po_step(trainers[name], batch)
        return {"s": timer.seconds}

    samples = interleaved([*variants, "vision"], args.repeats, args.warmup, run)
    rows = []
    for name in variants:
        rows.append(Row(setting, name, "samples/s", [args.batch / s for s in samples[name]["s"]], True, BASELINE))
        rows.append(Row(setting, name, "step s", samples[name]["s"], False, BASELINE))
    vision, naive, shared = samples["vision"]["s"], samples["naive"]["s"], samples["shared"]["s"]
    # Per-round ratios; no baseline row ("-" in the ratio column).
    rows.append(Row(setting, "vision", "vision pass s", vision, False, "-"))
    share = [v / n for v, n in zip(vision, naive)]
    rows.append(Row(setting, "vision", "share of naive step", share, False, "-"))
    rows.append(Row(setting, "vision", "expected speed-up", [1 / (1 - s) for s in share], True, "-"))
    rows.append(Row(setting, "shared", "measured speed-up", [n / s for n, s in zip(naive, shared)], True, "-"))

    memory_metric = "peak MiB (cuda max allocated)" if device.type == "cuda" else "peak MiB (profiler allocations)"
    for name in variants:
        peak = peak_step_mib(functools.partial(po_step, trainers[name], batch), device)
        rows.append(Row(setting, name, memory_metric, [peak], False, BASELINE))
    del trainers
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(**TINY_TEXT_DEFAULTS)
    parser.add_argument(
        "--vision-layers",
        type=int,
        default=None,
        help=f"InternViT-300M-448px layers (default: {DEFAULT_VISION_LAYERS}; with --preset, the preset's 24)",
    )
    parser.add_argument("--stages", default="1,2", help="training stages to measure, comma-separated")
    parser.add_argument(
        "--batch", type=int, default=None, help="triples per step, one image each (default: 2 on CPU, 8 on CUDA)"
    )
    parser.add_argument("--prompt-words", type=int, default=16, help="words of each prompt (plus the image tokens)")
    parser.add_argument("--answer-words", type=int, default=32, help="words of each chosen and rejected answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds (after each trainer's set-up step)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.vocab_size is None and not args.preset:
        args.vocab_size = TINY_VOCAB_SIZE
    setup_runtime(args)
    device = torch.device(args.device)
    if args.batch is None:
        args.batch = 8 if device.type == "cuda" else 2
    stages = [int(stage) for stage in args.stages.split(",")]
    if any(stage not in (1, 2) for stage in stages):
        raise ValueError(f"--stages takes 1 and/or 2, got {args.stages!r}")
    disable_progress_bars()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    tokenizer = build_tokenizer(WORDS, padding_side="right")
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    rows: list[Row] = []
    for attn in attn_implementations(args):
        config = phantom_config(args, image_token_id, attn)
        vision_config = config.vision_config
        print(
            f"decoder: {shape_label(config.text_config)}; vision: InternViT {vision_config.num_hidden_layers} layers, "
            f"hidden {vision_config.hidden_size}, {vision_config.image_size[0]} px tiles, {config.image_seq_length} "
            f"tokens per tile; {args.dtype} {attn} on {device}; {machine_info(device)}",
            flush=True,
        )
        torch.manual_seed(args.seed)
        model = PhantomForConditionalGeneration(config).to(device=device, dtype=getattr(torch, args.dtype))
        processor = PhantomProcessor.from_config(config, tokenizer, max_patches=1)
        data = triples(args.batch, args.prompt_words, args.answer_words, vision_config.image_size[0], args.seed)
        with tempfile.TemporaryDirectory() as workdir:
            for stage in stages:
                stage_rows = run_stage(stage, model, processor, data, args, workdir, device)
                for row in stage_rows:
                    row.setting = f"{attn} {row.setting}"
                print(format_table(stage_rows, stage_rows[0].setting), flush=True)
                median = {(row.variant, row.metric): row.median for row in stage_rows}
                print(
                    f"vision pass = {median['vision', 'share of naive step']:.1%} of the naive step: expected "
                    f"speed-up {median['vision', 'expected speed-up']:.3f}, "
                    f"measured {median['shared', 'measured speed-up']:.3f}",
                    flush=True,
                )
                rows += stage_rows
        del model
        gc.collect()

    title = f"train: one PO step, {args.batch} triples x 1 tile; {args.dtype} on {device}; {args.repeats} repeats"
    report("train", title, rows, args, device)
    return rows


if __name__ == "__main__":
    main()
