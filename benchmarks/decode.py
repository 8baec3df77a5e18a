"""Decoding speed with Phantom Dimension off (the plain backbone) vs on, at a real model shape.

For each (batch, context) setting both models prefill the same random prompt once (timed: prefill
seconds), then greedy-decode `--new-tokens` tokens from that prefix `--repeats` times (timed:
tokens/s = batch * new tokens / seconds), rewinding the cache between repeats. Variants run
interleaved in one process after `--warmup` unmeasured rounds. The weights are random (identical
backbone tensors in both models); the input is text only.

Variants (`--variants`, the first is the baseline): `plain` (the backbone, transformers' DynamicCache, which
appends with torch.cat), `phantom` (Phantom Dimension on, its default PhantomCache: expanded, in-place
growing buffers), and for before/after comparisons `phantom-cat` (PhantomCache with transformers'
DynamicLayer, torch.cat per step: the previous behaviour), `plain-buffered` (the backbone with
PhantomCache's buffered layers) and `plain-matched` (the backbone with all of Phantom's decode machinery:
the buffered layers and, for sdpa, the packed-GQA decode attention that Phantom attention uses on CPU, where
transformers passes enable_gqa; phantom vs plain-matched is the cost of Phantom Dimension itself).

    python benchmarks/decode.py                       # Qwen2-0.5B shape, the CPU default grid
    python benchmarks/decode.py --settings 1x1024 --repeats 5 --json decode.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Row,
    Timer,
    add_model_arguments,
    add_variants_argument,
    attn_implementations,
    build_models,
    format_table,
    interleaved,
    machine_info,
    model_specs,
    report,
    selected_variants,
    setup_runtime,
    shape_label,
    text_config_from_args,
    with_stock_layers,
)
from phantom_hf import PhantomCache  # noqa: E402
from phantom_hf.modeling.compat_phantom import cache_kwargs, cache_of  # noqa: E402

# variant -> the model (of common.model_specs) it decodes with; new_cache gives its cache
MODEL_OF = {"plain": "plain", "phantom": "phantom", "phantom-cat": "phantom", "plain-buffered": "plain", "plain-matched": "plain-packed"}
VARIANTS = tuple(MODEL_OF)


def new_cache(variant: str) -> Any:
    """The empty cache a variant prefills into (None: the model's default)."""
    if variant == "phantom-cat":
        return with_stock_layers(PhantomCache())
    if variant in ("plain-buffered", "plain-matched"):
        return PhantomCache()
    return None
DEFAULT_SETTINGS = {"cpu": "1x256,1x1024,8x256", "cuda": "1x256,1x1024,1x4096,8x256,8x1024,8x4096"}


def parse_settings(text: str) -> list[tuple[int, int]]:
    """'1x256,8x1024' -> [(1, 256), (8, 1024)] (batch x context)."""
    settings = []
    for item in text.split(","):
        try:
            batch, context = item.lower().split("x")
            settings.append((int(batch), int(context)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"settings must look like 1x256,8x1024; got {item!r}") from None
    return settings


class DecodeState:
    """A model's prefilled cache for one setting, from which decoding can be repeated."""

    def __init__(
        self, model: Any, input_ids: torch.Tensor, max_new_tokens: int, timer_device: torch.device, cache: Any = None
    ) -> None:
        self.model = model
        self.device = timer_device
        self.context = input_ids.shape[1]
        self.mask = torch.ones(input_ids.shape[0], self.context + max_new_tokens + 1, dtype=torch.long, device=input_ids.device)
        with torch.inference_mode(), Timer(timer_device) as timer:
            out = model(
                input_ids=input_ids,
                attention_mask=self.mask[:, : self.context],
                **cache_kwargs(cache),
                use_cache=True,
                logits_to_keep=1,
            )
            self.first_token = out.logits[:, -1].argmax(-1, keepdim=True)
        self.prefill_seconds = timer.seconds
        self.cache = cache_of(out)

    def decode(self, new_tokens: int) -> float:
        """Greedy-decode `new_tokens` tokens after the prefix; returns seconds. Leaves the cache at the prefix."""
        token = self.first_token
        with torch.inference_mode(), Timer(self.device) as timer:
            for step in range(new_tokens):
                length = self.context + step + 1
                out = self.model(
                    input_ids=token,
                    attention_mask=self.mask[:, :length],
                    **cache_kwargs(self.cache),
                    use_cache=True,
                    logits_to_keep=1,
                )
                token = out.logits[:, -1].argmax(-1, keepdim=True)
        self.cache.crop(-new_tokens)
        return timer.seconds


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--settings", type=parse_settings, default=None, help="batch x context list (default: per device)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per measured repeat")
    parser.add_argument("--repeats", type=int, default=3, help="measured decode repeats per variant and setting")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured decode rounds before the repeats")
    parser.add_argument("--prefill-repeats", type=int, default=1, help="measured prefills per variant and setting (a short warm-up call precedes all)")
    add_variants_argument(parser, VARIANTS, "plain,phantom")
    args = parser.parse_args(argv)
    names = selected_variants(parser, args, VARIANTS)
    baseline = names[0]
    setup_runtime(args)
    device = torch.device(args.device)
    settings = args.settings or parse_settings(DEFAULT_SETTINGS["cuda" if device.type == "cuda" else "cpu"])
    text_config = text_config_from_args(args)
    print(f"shape: {shape_label(text_config)}; {args.dtype} on {device}; {machine_info(device)}", flush=True)

    rows: list[Row] = []
    for attn in attn_implementations(args):
        models = build_models(text_config, model_specs(attn), args.device, args.dtype, attn)
        for name in names:  # first-call costs (allocator, kernel selection) stay out of the measurements
            warm = torch.ones(1, 16, dtype=torch.long, device=device)
            DecodeState(models[MODEL_OF[name]], warm, 2, device, new_cache(name)).decode(2)
        for batch, context in settings:
            setting = f"{attn} b{batch} ctx{context}"
            generator = torch.Generator().manual_seed(args.seed)
            input_ids = torch.randint(10, text_config.vocab_size, (batch, context), generator=generator).to(device)
            states: dict[str, DecodeState] = {}
            prefill: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(args.prefill_repeats):
                for name in names:
                    states.pop(name, None)
                    state = DecodeState(models[MODEL_OF[name]], input_ids, args.new_tokens, device, new_cache(name))
                    prefill[name].append(state.prefill_seconds)
                    states[name] = state
            samples = interleaved(
                names,
                args.repeats,
                args.warmup,
                lambda name: {"tokens/s": batch * args.new_tokens / states[name].decode(args.new_tokens)},
            )
            for name in names:
                rows.append(Row(setting, name, "decode tokens/s", samples[name]["tokens/s"], True, baseline))
            for name in names:
                rows.append(Row(setting, name, "prefill s", prefill[name], False, baseline))
            print(format_table(rows[-2 * len(names) :], setting), flush=True)
        del models

    title = f"decode: {shape_label(text_config)}; {args.dtype} on {device}; {args.new_tokens} new tokens x {args.repeats} repeats"
    report("decode", title, rows, args, device)
    return rows


if __name__ == "__main__":
    main()
