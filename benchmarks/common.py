"""Shared pieces of the benchmarks: model construction at a real shape, timers, repeated interleaved
measurement and the result table.

Every benchmark builds its variants in one process and measures them interleaved (repeat 1 of every
variant, then repeat 2, ...), after an unmeasured warm-up, so that machine drift hits all variants alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from phantom_hf import PhantomCache, PhantomConfig, PhantomForConditionalGeneration
from phantom_hf.modeling.cache_phantom import BufferedDynamicLayer
from phantom_hf.modeling.modeling_phantom import sdpa_attention_packed_decode
from phantom_hf.tiny import tiny_vision_config

# The default decoder: Qwen2-0.5B as in the phantom-0.5b preset (paper Sec. 4); the shape flags
# default to its dimensions and override them.
DEFAULT_PRESET = "phantom-0.5b"
_DEFAULT_TEXT = PhantomConfig.from_preset(DEFAULT_PRESET).text_config
QWEN2_05B_SHAPE = dict(
    num_hidden_layers=_DEFAULT_TEXT.num_hidden_layers,
    hidden_size=_DEFAULT_TEXT.hidden_size,
    num_attention_heads=_DEFAULT_TEXT.num_attention_heads,
    num_key_value_heads=_DEFAULT_TEXT.num_key_value_heads,
    head_dim=getattr(_DEFAULT_TEXT, "head_dim", None) or _DEFAULT_TEXT.hidden_size // _DEFAULT_TEXT.num_attention_heads,
    intermediate_size=_DEFAULT_TEXT.intermediate_size,
    vocab_size=_DEFAULT_TEXT.vocab_size,
)


PACKED_SDPA = "sdpa_packed_gqa"
# `attn_implementation=PACKED_SDPA` gives the plain backbone the same sdpa function as Phantom attention's
AttentionInterface.register(PACKED_SDPA, sdpa_attention_packed_decode)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def model_specs(attn: str) -> dict[str, dict[str, Any]]:
    """`build_models` variants for one attention implementation: Phantom (first: it has the most parameters),
    the plain backbone, and the plain backbone with Phantom's decode attention ("plain-packed"; differs from
    "plain" only for sdpa decode steps on CPU, through `PACKED_SDPA`)."""
    return {
        "phantom": dict(phantom_dimension=True),
        "plain": dict(phantom_dimension=False),
        "plain-packed": dict(phantom_dimension=False, attn_implementation=PACKED_SDPA if attn == "sdpa" else attn),
    }


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the model shape, device, dtype and attention implementation."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--preset",
        default=None,
        help="decoder of a published Phantom size (phantom-0.5b, phantom-1.8b, phantom-3.8b, phantom-7b; "
        "PhantomConfig.from_preset); overrides the shape flags below except --vocab-size",
    )
    group.add_argument("--layers", type=int, default=QWEN2_05B_SHAPE["num_hidden_layers"])
    group.add_argument("--hidden-size", type=int, default=QWEN2_05B_SHAPE["hidden_size"])
    group.add_argument("--heads", type=int, default=QWEN2_05B_SHAPE["num_attention_heads"])
    group.add_argument("--kv-heads", type=int, default=QWEN2_05B_SHAPE["num_key_value_heads"])
    group.add_argument("--head-dim", type=int, default=QWEN2_05B_SHAPE["head_dim"])
    group.add_argument("--intermediate-size", type=int, default=QWEN2_05B_SHAPE["intermediate_size"])
    group.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"vocabulary size (default: the shape's own, {QWEN2_05B_SHAPE['vocab_size']} for phantom-0.5b); the LM head is a large share of "
        "a small model's decode step, so a smaller vocabulary raises Phantom's relative cost",
    )
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    group.add_argument(
        "--attn",
        default=None,
        help="attention implementations to compare, comma-separated (default: sdpa, plus flash_attention_2 on CUDA "
        "when the flash_attn package is installed)",
    )
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="CPU timing clock: wall time, or CPU time of the process (robust to other load; use with --threads 1)",
    )
    group.add_argument("--seed", type=int, default=0)


def add_variants_argument(parser: argparse.ArgumentParser, choices: tuple[str, ...], default: str) -> None:
    """`--variants` (comma-separated from `choices`, the first is the baseline) and `--json OUT`."""
    parser.add_argument("--variants", default=default, help=f"comma-separated, first = baseline; from {', '.join(choices)}")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")


def selected_variants(parser: argparse.ArgumentParser, args: argparse.Namespace, choices: tuple[str, ...]) -> list[str]:
    """The `--variants` list, in order; an unknown or empty list is a usage error."""
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(choices))
    if unknown or not names:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(choices)}")
    return names


def setup_runtime(args: argparse.Namespace) -> None:
    """Apply --threads and --seed; resolve --dtype and --attn defaults in place."""
    if args.threads:
        torch.set_num_threads(args.threads)
    Timer.clock = args.clock
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.attn is None:
        attns = ["sdpa"]
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            attns.append("flash_attention_2")
        args.attn = ",".join(attns)


def attn_implementations(args: argparse.Namespace) -> list[str]:
    return [name.strip() for name in args.attn.split(",") if name.strip()]


def text_config_from_args(args: argparse.Namespace) -> PretrainedConfig:
    """The decoder config: a --preset's text config when given, else the phantom-0.5b one with the flag dimensions."""
    if args.preset:
        text = PhantomConfig.from_preset(args.preset).text_config
    else:
        shape = dict(
            num_hidden_layers=args.layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            head_dim=args.head_dim,
            intermediate_size=args.intermediate_size,
        )
        text = PhantomConfig.from_preset(DEFAULT_PRESET, text_config=shape).text_config
    if args.vocab_size:
        text.vocab_size = args.vocab_size
    return text


def shape_label(text_config: Any) -> str:
    return (
        f"{text_config.num_hidden_layers} layers, hidden {text_config.hidden_size}, "
        f"{text_config.num_attention_heads} q / {text_config.num_key_value_heads} kv heads, "
        f"head_dim {getattr(text_config, 'head_dim', None) or text_config.hidden_size // text_config.num_attention_heads}, "
        f"intermediate {text_config.intermediate_size}, vocab {text_config.vocab_size}"
    )


def build_models(
    text_config: Any,
    variants: dict[str, dict[str, Any]],
    device: str,
    dtype: str,
    attn_implementation: str,
) -> dict[str, PhantomForConditionalGeneration]:
    """One random-weight model per variant (PhantomConfig overrides, plus an optional `attn_implementation` in
    place of `attn_implementation`), all sharing the same backbone tensors.

    The first variant is built and initialised; every other one is built on the meta device and takes the
    first one's tensors by reference (`assign=True`), so the backbones are identical and memory is paid
    once: list the variant with the most parameters (Phantom Dimension on) first. The vision tower is tiny:
    the benchmarks feed text only.
    """
    torch_dtype = getattr(torch, dtype)
    models: dict[str, PhantomForConditionalGeneration] = {}
    reference: PhantomForConditionalGeneration | None = None
    for name, overrides in variants.items():
        overrides = dict(overrides)
        implementation = overrides.pop("attn_implementation", attn_implementation)
        config = PhantomConfig(
            text_config=text_config.to_dict(), vision_config=tiny_vision_config(), image_token_id=None, **overrides
        )
        config._attn_implementation = implementation
        config.text_config._attn_implementation = implementation
        if reference is None:  # initialised where it runs: on a GPU that takes seconds, not a CPU's minute at 1.8B
            with torch.device(device):
                model = PhantomForConditionalGeneration(config).to(dtype=torch_dtype)
        else:
            with torch.device("meta"):
                model = PhantomForConditionalGeneration(config)
            missing, _ = model.load_state_dict(reference.state_dict(), strict=False, assign=True)
            if missing:
                raise ValueError(f"variant {name!r} has parameters the first variant lacks: {missing[:4]}; list the largest first")
            reference_buffers = dict(reference.named_buffers())
            for buffer_name, buffer in list(model.named_buffers()):
                if buffer.is_meta:
                    owner, _, leaf = buffer_name.rpartition(".")
                    model.get_submodule(owner)._buffers[leaf] = reference_buffers[buffer_name]
            model.tie_weights()
            leftover = [key for key, tensor in model.state_dict().items() if tensor.is_meta]
            if leftover:
                raise RuntimeError(f"variant {name}: tensors left on the meta device: {leftover[:4]}")
        model.eval()
        models[name] = model
        reference = reference or model
    return models


def with_stock_layers(cache: PhantomCache) -> PhantomCache:
    """`cache` with transformers' `DynamicLayer` (torch.cat on every update, as `DynamicCache`) in place of its
    `BufferedDynamicLayer`s, holding contiguous copies of the same tokens: PhantomCache as it was before the
    buffered layers, for before/after comparisons in one run."""
    layers = []
    for layer in cache.layers:
        if isinstance(layer, BufferedDynamicLayer):
            stock = DynamicLayer()
            if layer.get_seq_length() > 0:
                stock.update(layer.keys.contiguous(), layer.values.contiguous())
            layer = stock
        layers.append(layer)
    cache.layers = layers
    if cache.layer_class_to_replicate is not None:
        cache.layer_class_to_replicate = DynamicLayer
    return cache


def cache_bytes(cache: Any) -> dict[str, int]:
    """Bytes of a cache: its filled keys/values ("key_value"), the buffers behind them ("reserved", spare room
    included; equal to key_value for `DynamicLayer`) and (PhantomCache) the anchors."""
    key_value = reserved = 0
    for layer in cache.layers:
        filled = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        key_value += filled
        length = layer.get_seq_length()
        reserved += filled * layer.capacity // length if isinstance(layer, BufferedDynamicLayer) and length else filled
    anchors = sum(t.numel() * t.element_size() for layer in getattr(cache, "anchors", {}).values() for t in layer)
    return {"key_value": key_value, "reserved": reserved, "anchors": anchors}


class Timer:
    """Times a block: CUDA events on a GPU (device time of the stream); on the CPU `time.perf_counter`
    (clock "wall") or `time.process_time` (clock "process": CPU seconds of this process, which other
    processes on a shared machine do not inflate; use it with --threads 1, where no thread spin-waits)."""

    clock = "wall"

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._now = time.process_time if Timer.clock == "process" else time.perf_counter

    def __enter__(self) -> "Timer":
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = self._now()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000
        else:
            self.seconds = self._now() - self._t0


@dataclass
class Row:
    """One line of a result table: a setting, a variant, the samples of one metric and its baseline."""

    setting: str
    variant: str
    metric: str
    samples: list[float]
    higher_is_better: bool
    baseline: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def interleaved(
    variants: list[str], repeats: int, warmup: int, run: Callable[[str], dict[str, float]]
) -> dict[str, dict[str, list[float]]]:
    """Call `run(variant)` for every variant, `warmup` unmeasured rounds then `repeats` measured ones,
    variants interleaved within each round. Returns variant -> metric -> samples."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for round_index in range(warmup + repeats):
        for name in variants:
            result = run(name)
            if round_index >= warmup:
                for metric, value in result.items():
                    samples[name].setdefault(metric, []).append(value)
    return samples


def format_table(rows: list[Row], title: str) -> str:
    """A Markdown table: setting, variant, metric, median, min, max, ratio of medians to the baseline row."""
    medians = {(row.setting, row.variant, row.metric): row.median for row in rows}
    lines = [f"### {title}", "", "| setting | variant | metric | median | min | max | vs baseline |", "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        base = medians.get((row.setting, row.baseline, row.metric))
        ratio = f"{row.median / base:.3f}" if base else "-"
        lines.append(
            f"| {row.setting} | {row.variant} | {row.metric} | {_fmt(row.median)} | {_fmt(min(row.samples))} | "
            f"{_fmt(max(row.samples))} | {ratio} |"
        )
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "clock": "cuda events" if device.type == "cuda" else Timer.clock,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def report(benchmark: str, title: str, rows: list[Row], args: argparse.Namespace, device: torch.device) -> None:
    """Print the final table of a benchmark and, with `--json PATH`, write its rows, arguments and machine there."""
    print()
    print(format_table(rows, title))
    if args.json:
        write_rows(benchmark, rows, args, device, complete=True)
        print(f"wrote {args.json}")


def write_rows(benchmark: str, rows: list[Row], args: argparse.Namespace, device: torch.device, complete: bool) -> None:
    """Write the rows so far to `--json` (`complete` False: the run goes on, and a caller that has to stop it
    early still has every finished setting)."""
    payload = {"benchmark": benchmark, "complete": complete, "args": vars(args), "machine": machine_info(device)}
    payload["rows"] = [dict(asdict(row), median=row.median) for row in rows]
    Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
