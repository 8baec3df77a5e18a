"""Per-step decode time vs context length for the two PhantomCache modes, and the memory of each cache.

Variants, all on the same random-weight backbone:
  plain     the backbone without Phantom Dimension (DynamicCache of k, v): the baseline;
  expanded  Phantom, PhantomCache(mode="expanded"): caches [k, k*] and [v, v*]; a step expands its new token only;
  compact   Phantom, PhantomCache(mode="compact"): caches plain k, v; a step re-expands every cached token.

Each model prefills one random prompt of the largest context once; the compact cache is the expanded one
cut to its first head_dim features (exactly the plain k, v that compact mode stores; the anchors are the
same). Contexts are then measured from the largest down, cropping the caches between them: at each
context every variant decodes `--steps` tokens (timed, per-step milliseconds), interleaved, `--repeats`
times after `--warmup` rounds, and the cache is rewound. "overhead ms" is a variant's per-step time minus
plain's in the same round: flat in the context for expanded, growing linearly for compact.

    python benchmarks/cache.py --contexts 256,1024,2048,4096 --json cache.json
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
    attn_implementations,
    build_models,
    format_table,
    interleaved,
    machine_info,
    setup_runtime,
    shape_label,
    text_config_from_args,
    write_json,
)
from phantom_hf import PhantomCache  # noqa: E402

BASELINE = "plain"
VARIANTS = ("plain", "expanded", "compact")


def cache_bytes(cache: Any) -> dict[str, int]:
    """Bytes held by a cache's tensors: keys and values, and (PhantomCache) the anchors."""
    key_value = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    anchors = sum(t.numel() * t.element_size() for layer in getattr(cache, "anchors", {}).values() for t in layer.values())
    return {"key_value": key_value, "anchors": anchors}


def compact_copy(expanded: PhantomCache, head_dim: int) -> PhantomCache:
    """The compact cache of the same prefix: the first head_dim features of [k, k*] and [v, v*] are k and v."""
    cache = PhantomCache(mode="compact")
    for layer_idx, layer in enumerate(expanded.layers):
        cache.update(layer.keys[..., :head_dim].contiguous(), layer.values[..., :head_dim].contiguous(), layer_idx)
    cache.anchors = {layer_idx: dict(tensors) for layer_idx, tensors in expanded.anchors.items()}
    return cache


def decode_steps(model: Any, cache: Any, token: torch.Tensor, context: int, steps: int, device: torch.device) -> float:
    """Seconds per step of `steps` greedy decode steps after a cache of `context` tokens; rewinds the cache."""
    mask = torch.ones(token.shape[0], context + steps, dtype=torch.long, device=device)
    with torch.inference_mode(), Timer(device) as timer:
        for step in range(steps):
            out = model(
                input_ids=token,
                attention_mask=mask[:, : context + step + 1],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    cache.crop(-steps)
    return timer.seconds / steps


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--contexts", default="256,1024,2048,4096", help="context lengths, comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    setup_runtime(args)
    device = torch.device(args.device)
    contexts = sorted({int(c) for c in args.contexts.split(",")}, reverse=True)
    text_config = text_config_from_args(args)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    print(f"shape: {shape_label(text_config)}; {args.dtype} on {device}; {machine_info(device)}", flush=True)

    rows: list[Row] = []
    for attn in attn_implementations(args):
        models = build_models(
            text_config, {"phantom": dict(phantom_dimension=True), "plain": dict(phantom_dimension=False)}, args.device, args.dtype, attn
        )
        generator = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(10, text_config.vocab_size, (args.batch, contexts[0]), generator=generator).to(device)
        token = prompt[:, -1:]
        with torch.inference_mode():
            caches = {
                "plain": models["plain"](input_ids=prompt, use_cache=True, logits_to_keep=1).past_key_values,
                "expanded": models["phantom"](input_ids=prompt, use_cache=True, logits_to_keep=1).past_key_values,
            }
        caches["compact"] = compact_copy(caches["expanded"], head_dim)
        variant_model = {"plain": models["plain"], "expanded": models["phantom"], "compact": models["phantom"]}
        current = contexts[0]
        for context in contexts:
            if context < current:
                for cache in caches.values():
                    cache.crop(context - current)
            current = context
            setting = f"{attn} b{args.batch} ctx{context}"
            samples = interleaved(
                list(VARIANTS),
                args.repeats,
                args.warmup,
                lambda name: {"ms": 1000 * decode_steps(variant_model[name], caches[name], token, context, args.steps, device)},
            )
            new_rows = []
            for name in VARIANTS:
                new_rows.append(Row(setting, name, "step ms", samples[name]["ms"], False, BASELINE))
            for name in VARIANTS[1:]:
                overhead = [a - b for a, b in zip(samples[name]["ms"], samples[BASELINE]["ms"])]
                new_rows.append(Row(setting, name, "overhead ms", overhead, False, "expanded"))
            for name in VARIANTS:
                sizes = cache_bytes(caches[name])
                new_rows.append(Row(setting, name, "cache MiB", [sum(sizes.values()) / 2**20], False, BASELINE, extra=sizes))
            rows += new_rows
            print(format_table(new_rows, setting), flush=True)
        del models, caches

    title = f"cache: {shape_label(text_config)}; {args.dtype} on {device}; {args.steps} steps x {args.repeats} repeats"
    print()
    print(format_table(rows, title))
    write_json(args.json, {"benchmark": "cache", "args": vars(args), "machine": machine_info(device)}, rows)
    return rows


if __name__ == "__main__":
    main()
