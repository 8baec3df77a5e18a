"""Memory and decoding speed of Phantom loaded in float32, bfloat16, 8-bit and 4-bit, beside the plain backbone
loaded the same way.

A random-weight Phantom model at a real shape (Qwen2-0.5B by default, tiny vision tower: text-only input) is
saved once in bfloat16; each precision loads it from that folder with `from_pretrained(..., quantization_config=...)`,
as a user does, in fresh processes:

- weights MiB: the bytes of every parameter and buffer as stored (a quantized weight's packed data, scales
  and statistics; the kept modules, vision tower, embeddings and `lm_head` in the compute dtype);
- peak MiB loading / decoding: the peak resident memory of the process while loading, and while decoding, above
  its resident memory before loading (CPU: VmHWM, reset through /proc/self/clear_refs after loading); on a GPU,
  torch's peak allocated bytes. The decoding peak, after the memory-mapped checkpoint was let go and the memory
  freed by loading went back to the OS, is what running the model needs (weights, activations, cache); the
  loading peak is higher where the checkpoint's tensors are converted before quantizing, and low where they stay
  memory-mapped from the file until first use (bfloat16 from a bfloat16 checkpoint);
- decode tokens/s: greedy decoding of `--new-tokens` tokens after a `--context`-token random prompt
  (`decode.py`'s `DecodeState`), `--repeats` times after `--warmup` rounds, plain and Phantom interleaved.

"plain" is the same folder loaded with `phantom_dimension=False` (the Phantom weights are left unused). Memory is
measured in a process per model that holds that model alone (and decodes `--new-tokens` once); speed in a process
per precision that holds both models and decodes them interleaved.

Precisions (`--precisions`): `float32`, `bfloat16`, `bnb-int8` (bitsandbytes LLM.int8), `bnb-nf4` (bitsandbytes
nf4, double quantization), `torchao-int8` (weight-only int8, per channel), `torchao-int4` (weight-only int4 in
groups of 32; on the CPU `IntxWeightOnlyConfig`, whose int4 values are kept one per byte, on CUDA
`Int4WeightOnlyConfig`). The quantized rows compute in `--dtype` (their kept modules, the embeddings and `lm_head`
are stored in it too).

    python benchmarks/quantization.py --threads 1 --clock process
    python benchmarks/quantization.py --precisions float32,bnb-nf4 --layers 4 --vocab-size 4096   # a quick look
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Row,
    add_model_arguments,
    interleaved,
    machine_info,
    report,
    setup_runtime,
    shape_label,
    text_config_from_args,
)
from decode import DecodeState  # noqa: E402
from phantom_hf import PhantomConfig, PhantomForConditionalGeneration  # noqa: E402
from phantom_hf.tiny import tiny_vision_config  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "bnb-int8", "bnb-nf4", "torchao-int8", "torchao-int4")
MODELS = ("plain", "phantom")
MIB = 2**20


def quantization_config(precision: str, compute_dtype: torch.dtype, device: torch.device) -> Any:
    """The `quantization_config` of a precision (None for float32 / bfloat16)."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if precision == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if precision == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
        )
    if precision == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if precision == "torchao-int4":
        from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        if device.type == "cuda":
            return TorchAoConfig(Int4WeightOnlyConfig(group_size=32))
        return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    return None


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor holds: a torchao tensor subclass's inner tensors, or a bitsandbytes
    weight's data plus its scales (`SCB`, 8-bit) or quantization state (absmax, code, ...: 4-bit)."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(tensor_bytes(getattr(data, name)) for name in names)
    total = data.numel() * data.element_size()
    scales = getattr(tensor, "SCB", None)
    if isinstance(scales, torch.Tensor):
        total += scales.numel() * scales.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        total += sum(value.numel() * value.element_size() for value in state.as_dict(packed=True).values() if isinstance(value, torch.Tensor))
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of `model` as stored (tied tensors once)."""
    return sum(tensor_bytes(tensor) for tensor in (*model.parameters(), *model.buffers()))


class PeakMemory:
    """Peak memory above the level at `start()`: resident memory (VmHWM) on the CPU, allocated bytes on CUDA.
    `reset()` starts a new peak (e.g. after loading) against the same level."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size

    def start(self) -> None:
        self.reset()
        self.base = torch.cuda.memory_allocated() if self.cuda else self._status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base


def release_loading_memory(model: torch.nn.Module) -> None:
    """Let go of what loading left resident: the memory-mapped checkpoint (tensors loaded without conversion are
    views of the file, and keep every page of it that loading touched resident; they are copied out) and the
    memory freed by loading, handed back to the OS (glibc's `malloc_trim`; elsewhere a no-op). The decoding peak
    then counts what running the model holds."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if type(tensor.data) is torch.Tensor and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def save_random_model(text_config: Any, folder: Path, attn: str) -> None:
    """A random-weight Phantom model at `text_config`'s shape (tiny vision tower), saved in bfloat16."""
    config = PhantomConfig(text_config=text_config.to_dict(), vision_config=tiny_vision_config(), image_token_id=None)
    config._attn_implementation = attn
    PhantomForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(folder)


def compute_dtype(args: argparse.Namespace) -> torch.dtype:
    return getattr(torch, args.precision) if args.precision in ("float32", "bfloat16") else getattr(torch, args.dtype)


def load(args: argparse.Namespace, model: str, config: Any) -> PhantomForConditionalGeneration:
    """One model from `args.folder` in `args.precision`: "phantom", or "plain" (`phantom_dimension=False`)."""
    return PhantomForConditionalGeneration.from_pretrained(
        args.folder,
        dtype=compute_dtype(args),
        quantization_config=config,
        phantom_dimension=model == "phantom",
        attn_implementation=args.attn,
        device_map=args.device,
    ).eval()


def prompt(args: argparse.Namespace, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(10, vocab_size, (args.batch, args.context), generator=generator).to(args.device)


def measure_memory(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    """Worker: load one model alone, then prefill and decode `--new-tokens` once; its weights and peak memory."""
    device = torch.device(args.device)
    config = quantization_config(args.precision, compute_dtype(args), device)  # imports the backend before measuring
    memory = PeakMemory(device)
    memory.start()
    model = load(args, model_name, config)
    load_peak = memory.peak()
    release_loading_memory(model)
    memory.reset()
    DecodeState(model, prompt(args, model.config.text_config.vocab_size), args.new_tokens, device).decode(args.new_tokens)
    return {
        "weights": weight_bytes(model),
        "load peak": load_peak,
        "decode peak": memory.peak(),
        "quantized": sum(1 for p in model.parameters() if type(p.data) is not torch.Tensor or not p.dtype.is_floating_point),
    }


def measure_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Worker: both models in one process, prefilled with the same prompt, decoding interleaved."""
    device = torch.device(args.device)
    config = quantization_config(args.precision, compute_dtype(args), device)
    states = {}
    for name in MODELS:
        model = load(args, name, config)
        states[name] = DecodeState(model, prompt(args, model.config.text_config.vocab_size), args.new_tokens, device)
    samples = interleaved(
        list(MODELS), args.repeats, args.warmup, lambda name: {"tokens/s": args.batch * args.new_tokens / states[name].decode(args.new_tokens)}
    )
    return {name: {"tokens/s": samples[name]["tokens/s"], "prefill s": states[name].prefill_seconds} for name in MODELS}


def summary_table(rows: list[Row], title: str) -> str:
    """One line per precision: weights, peak memory and tokens/s of the plain backbone and of Phantom side by
    side, Phantom's tokens/s as a ratio to plain's, and each model's tokens/s against its own row of the first
    precision."""
    values = {(row.setting, row.variant, row.metric): row.median for row in rows}
    precisions = list(dict.fromkeys(row.setting for row in rows))
    reference = precisions[0] if precisions else "-"
    lines = [
        f"### {title}",
        "",
        "| precision | weights MiB plain / phantom | peak MiB loading, plain / phantom | peak MiB decoding, plain / phantom "
        f"| decode tokens/s plain / phantom | phantom vs plain | vs {reference} plain / phantom |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for precision in precisions:
        cells = []
        for metric, digits in (("weights MiB", 0), ("load peak MiB", 0), ("decode peak MiB", 0), ("decode tokens/s", 2)):
            pair = [values.get((precision, model, metric)) for model in MODELS]
            cells.append(" / ".join("-" if value is None else f"{value:.{digits}f}" for value in pair))
        plain, phantom = (values.get((precision, model, "decode tokens/s")) for model in MODELS)
        cells.append(f"{phantom / plain:.3f}" if plain and phantom else "-")
        against = []
        for model in MODELS:
            base, value = values.get((reference, model, "decode tokens/s")), values.get((precision, model, "decode tokens/s"))
            against.append(f"{value / base:.2f}" if base and value else "-")
        cells.append(" / ".join(against))
        lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated, from {', '.join(PRECISIONS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=256, help="prompt tokens before decoding")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per measured repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--memory-repeats", type=int, default=1, help="memory processes per model (each peak is one sample)"
    )
    parser.add_argument("--folder", default=None, help="where the random model is saved (default: a temporary folder)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--worker", nargs=2, metavar=("PRECISION", "MODEL|speed"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_runtime(args)
    if len(attns := args.attn.split(",")) > 1:
        parser.error("--attn: one attention implementation at a time")
    if args.worker:
        args.precision, task = args.worker
        print(json.dumps(measure_speed(args) if task == "speed" else measure_memory(args, task)))
        return []

    precisions = [name.strip() for name in args.precisions.split(",") if name.strip()]
    if unknown := sorted(set(precisions) - set(PRECISIONS)):
        parser.error(f"--precisions: unknown {unknown}; choose from {', '.join(PRECISIONS)}")
    device = torch.device(args.device)
    text_config = text_config_from_args(args)
    print(f"shape: {shape_label(text_config)}; compute {args.dtype} on {device}; {machine_info(device)}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.folder or scratch)
        if not (folder / "config.json").is_file():
            save_random_model(text_config, folder, attns[0])
        forwarded = list(argv if argv is not None else sys.argv[1:])

        def run_worker(precision: str, task: str) -> dict[str, Any] | None:
            command = [sys.executable, __file__, *forwarded, "--folder", str(folder), "--worker", precision, task]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"{precision} {task}: failed\n{result.stderr[-2000:]}", flush=True)
                return None
            return json.loads(result.stdout.strip().splitlines()[-1])

        rows: list[Row] = []
        for precision in precisions:
            speed = run_worker(precision, "speed")
            # memory processes of the two models alternate, so that drift of the machine reaches both alike
            memories: dict[str, list[dict[str, Any]]] = {model: [] for model in MODELS}
            for _ in range(args.memory_repeats):
                for model in MODELS:
                    if (memory := run_worker(precision, model)) is not None:
                        memories[model].append(memory)
            for model in MODELS:
                if speed is not None:
                    extra = {"prefill_s": speed[model]["prefill s"]}
                    rows.append(Row(precision, model, "decode tokens/s", speed[model]["tokens/s"], True, "plain", extra))
                if not memories[model]:
                    continue
                extra = {"quantized_tensors": memories[model][0]["quantized"]}
                weights = [memory["weights"] / MIB for memory in memories[model]]
                rows.append(Row(precision, model, "weights MiB", weights, False, "plain", extra))
                for metric in ("load peak", "decode peak"):
                    peaks = [memory[metric] / MIB for memory in memories[model]]
                    rows.append(Row(precision, model, f"{metric} MiB", peaks, False, "plain"))
                tokens = sorted(speed[model]["tokens/s"]) if speed else "-"
                print(
                    f"{precision} {model}: {weights[0]:.0f} MiB weights, peak MiB loading "
                    f"{sorted(round(memory['load peak'] / MIB) for memory in memories[model])} / decoding "
                    f"{sorted(round(memory['decode peak'] / MIB) for memory in memories[model])}, {tokens} tokens/s",
                    flush=True,
                )
    title = (
        f"quantization: {shape_label(text_config)}; compute {args.dtype} on {device}; b{args.batch} ctx{args.context}, "
        f"{args.new_tokens} new tokens x {args.repeats} repeats"
    )
    report("quantization", title, rows, args, device)
    print()
    print(summary_table(rows, title))
    return rows


if __name__ == "__main__":
    main()
