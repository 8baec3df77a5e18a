"""Memory plan for training Phantom past one device: bytes per device of the weights, gradients and AdamW states of
the four published sizes (paper Sec. 4; `PhantomConfig.from_preset`), for 1, 2 and 8 devices under DDP, ZeRO-2 and
FSDP2 / ZeRO-3, in step 1 (projector + Phantom modules trained), step 2 (everything) and step 2 with LoRA.

    python benchmarks/memory_plan.py              # the table (parameter counts from models built on the meta device)
    python benchmarks/memory_plan.py --measure    # and the check at small scale: 1 vs 2 CPU processes under FSDP2

Accounting (bf16 mixed precision with fp32 master weights, as accelerate's FSDP2 and DeepSpeed bf16 set-ups keep
them): a trainable parameter costs 4 B of weight (fp32), 4 B of gradient and 8 B of AdamW moments (two fp32); a
frozen one 2 B of weight (bf16), nothing else. DDP replicates everything; ZeRO-2 shards gradients and optimizer
states; FSDP2 and ZeRO-3 shard all three. Not counted: activations (checkpointed by default), the bf16 compute copy
of the unit being gathered (FSDP2: the largest wrap unit, printed), communication buffers, the CUDA context.

`--measure` checks the sharding arithmetic on the CPU, in fp32 (4 B weights of every parameter): a small Phantom
model (1024-wide, 4-layer decoder) trains 2 steps with 1 process and with 2 FSDP2 processes (accelerate launch,
gloo, `PhantomPOTrainer`); each process reports the bytes its own tensors hold (local shards of weights, gradients
at the optimizer step, AdamW states after it) and its peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

GB = 1e9
SIZES = ("phantom-0.5b", "phantom-1.8b", "phantom-3.8b", "phantom-7b")
DEVICES = (1, 2, 8)
STEPS = ("step 1", "step 2", "step 2 + LoRA")
# Bytes per parameter: (trainable weight, frozen weight, gradient, optimizer state).
MIXED = (4, 2, 4, 8)
FP32 = (4, 4, 4, 8)


def parameter_counts(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """{step: {"trainable", "frozen", "largest_unit"}} for a Phantom model (on any device, meta included)."""
    from peft import get_peft_model

    from phantom_hf.trainer import apply_training_stage, phantom_lora_config

    # accelerate's FSDP2 units: the `_no_split_modules` classes, the input embeddings, [final norm, lm_head], the rest
    units = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    units += [model.get_input_embeddings(), model.get_output_embeddings()]
    largest = max(sum(p.numel() for p in unit.parameters()) for unit in units)
    counts = {}
    for stage, name in ((1, "step 1"), (2, "step 2")):
        apply_training_stage(model, stage, freeze_vision_tower=stage == 1)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        counts[name] = {"trainable": trainable, "frozen": sum(p.numel() for p in model.parameters()) - trainable}
    peft = get_peft_model(model, phantom_lora_config())
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    counts["step 2 + LoRA"] = {"trainable": trainable, "frozen": sum(p.numel() for p in peft.parameters()) - trainable}
    for entry in counts.values():
        entry["largest_unit"] = largest
    return counts


def plan(counts: dict[str, int], strategy: str, devices: int, sizes: tuple[int, int, int, int] = MIXED) -> dict:
    """Bytes per device of weights, gradients and optimizer states for one strategy and number of devices."""
    trainable_weight, frozen_weight, gradient, state = sizes
    weights = counts["trainable"] * trainable_weight + counts["frozen"] * frozen_weight
    gradients = counts["trainable"] * gradient
    optimizer = counts["trainable"] * state
    shard = {"DDP": (1, 1, 1), "ZeRO-2": (1, devices, devices), "FSDP2 / ZeRO-3": (devices, devices, devices)}[strategy]
    values = {"weights": weights / shard[0], "gradients": gradients / shard[1], "optimizer": optimizer / shard[2]}
    values["total"] = sum(values.values())
    return values


def table() -> str:
    from phantom_hf import PhantomConfig, PhantomForConditionalGeneration

    lines = [
        "| size | step | trainable / frozen params | strategy | 1 device | 2 devices | 8 devices |",
        "|---|---|---|---|---|---|---|",
    ]
    units = []
    for size in SIZES:
        with torch.device("meta"):
            model = PhantomForConditionalGeneration(PhantomConfig.from_preset(size))
        counts = parameter_counts(model)
        units.append(f"{size}: {counts['step 1']['largest_unit'] * 2 / GB:.3f} GB")
        for step in STEPS:
            entry = counts[step]
            for strategy in ("DDP", "ZeRO-2", "FSDP2 / ZeRO-3"):
                cells = []
                for devices in DEVICES:
                    values = plan(entry, strategy, devices)
                    cells.append(
                        f"{values['weights'] / GB:.2f} + {values['gradients'] / GB:.2f} + "
                        f"{values['optimizer'] / GB:.2f} = **{values['total'] / GB:.1f}**"
                    )
                params = f"{entry['trainable'] / 1e6:,.1f}M / {entry['frozen'] / 1e9:.3f}B"
                lines.append(f"| {size} | {step} | {params} | {strategy} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: weights + gradients + optimizer states = **total**, GB (1e9 B) per device. Largest FSDP2 wrap "
                 "unit in bf16 (gathered during its forward/backward, on top): " + "; ".join(units) + ".")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the small-scale measurement


def _small_model_and_data():
    from phantom_hf import PhantomForConditionalGeneration
    from phantom_hf.modeling.processing_phantom import PhantomProcessor
    from phantom_hf.synthetic import generate_examples, to_dataset, vocabulary
    from phantom_hf.tiny import tiny_phantom_config
    from phantom_hf.tokenization import build_tokenizer

    tokenizer = build_tokenizer(vocabulary(), padding_side="right")
    config = tiny_phantom_config(
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        text_config={"vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
                     "num_attention_heads": 16, "num_key_value_heads": 4},
    )
    torch.manual_seed(0)
    model = PhantomForConditionalGeneration(config)
    data = to_dataset(generate_examples(8, seed=0, image_size=28, kinds=("color",)))
    return model, PhantomProcessor.from_config(config, tokenizer), data


def _local_bytes(tensor: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def worker(stage: int, output: str) -> None:
    """One training run; writes this process's bytes of weights, gradients and optimizer states and its peak RSS."""
    from transformers import TrainerCallback

    from phantom_hf.trainer import PhantomPOConfig, PhantomPOTrainer

    torch.set_num_threads(1)
    model, processor, data = _small_model_and_data()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    measured: dict[str, int] = {}

    class Measure(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            measured["weights"] = sum(_local_bytes(p) for p in model.parameters())
            measured["gradients"] = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
            measured["optimizer"] = sum(
                _local_bytes(value) for values in optimizer.state.values() for value in values.values()
                if isinstance(value, torch.Tensor) and value.dim() > 0
            )

    config = PhantomPOConfig(
        output_dir=tempfile.mkdtemp(), training_stage=stage, max_steps=2, per_device_train_batch_size=4 // world,
        learning_rate=1e-4, bf16=False, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
    )
    trainer = PhantomPOTrainer(model, config, train_dataset=data, processing_class=processor, callbacks=[Measure()])
    trainer.train()
    measured["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    measured["distributed_type"] = str(trainer.accelerator.distributed_type)
    with open(f"{output}.rank{trainer.accelerator.process_index}.json", "w", encoding="utf-8") as handle:
        json.dump(measured, handle)


def measure() -> str:
    model, _, _ = _small_model_and_data()
    counts = parameter_counts(model)
    repo = Path(__file__).resolve().parents[1]
    config_text = (repo / "examples" / "accelerate" / "fsdp2.yaml").read_text(encoding="utf-8")
    config_text = config_text.replace("num_processes: 8", "num_processes: 2").replace("use_cpu: false", "use_cpu: true")
    config_text = config_text.replace("mixed_precision: bf16", "mixed_precision: 'no'")
    lines = [
        "| step | processes | strategy | weights MB plan / measured | gradients MB plan / measured | "
        "optimizer MB plan / measured | peak RSS MB per process |",
        "|---|---|---|---|---|---|---|",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as folder:
        accelerate_config = Path(folder) / "fsdp2.yaml"
        accelerate_config.write_text(config_text, encoding="utf-8")
        for stage, step in ((1, "step 1"), (2, "step 2")):
            for processes in (1, 2):
                output = str(Path(folder) / f"stage{stage}-{processes}")
                script = [__file__, "--worker", str(stage), output]
                if processes == 1:
                    command = [sys.executable, *script]
                else:
                    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(accelerate_config), "--main_process_port", "0", *script]
                subprocess.run(command, env=env, check=True, capture_output=True, timeout=1800)
                reports = [json.loads(Path(f"{output}.rank{rank}.json").read_text()) for rank in range(processes)]
                strategy = "FSDP2 / ZeRO-3" if processes > 1 else "DDP"
                expected = plan(counts[step], strategy, processes, FP32)
                cells = []
                for key in ("weights", "gradients", "optimizer"):
                    got = "/".join(f"{report[key] / 1e6:.2f}" for report in reports)
                    cells.append(f"{expected[key] / 1e6:.2f} / {got}")
                peak = "/".join(f"{report['peak_rss'] / 1e6:.0f}" for report in reports)
                kind = reports[0]["distributed_type"].split(".")[-1]
                lines.append(f"| {step} | {processes} | {kind} | " + " | ".join(cells) + f" | {peak} |")
    total = sum(p.numel() for p in model.parameters())
    lines.append("")
    lines.append(f"Small model: {total / 1e6:.1f}M parameters, fp32 on the CPU; measured per process (rank 0/rank 1).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="also run the 1 vs 2 process check on the CPU")
    parser.add_argument("--worker", nargs=2, metavar=("STAGE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), args.worker[1])
        return
    print(table())
    if args.measure:
        print()
        print(measure())


if __name__ == "__main__":
    main()
