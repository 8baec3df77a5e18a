"""Per-step decode time vs context length for the two PhantomCache modes, and the memory of each cache.

Variants, all on the same random-weight backbone (`--variants` picks a subset; the first is the baseline):
  plain           the backbone without Phantom Dimension, transformers' DynamicCache (torch.cat per step);
  plain-buffered  the same backbone with PhantomCache's in-place growing-buffer layers (no Phantom work);
  plain-matched   plain-buffered with, for sdpa, the packed-GQA decode attention that Phantom attention uses
                  on CPU (transformers passes enable_gqa there): the backbone with all of Phantom's decode
                  machinery, so that the overhead against it is Phantom Dimension's own;
  expanded        Phantom, PhantomCache(mode="expanded"): caches [k, k*] and [v, v*]; a step expands its new
                  token only and writes it in place (BufferedDynamicLayer);
  expanded-cat    the same with transformers' DynamicLayer: every step torch.cat-copies the whole cache (the
                  previous PhantomCache);
  compact         Phantom, PhantomCache(mode="compact"): caches plain k, v; a step re-expands every cached token;
  compact-cat     the same with DynamicLayer.

Each model prefills one random prompt of the largest context once (the base caches). Contexts are then
measured from the largest down, cropping the base caches between them; at each context every variant gets
a fresh copy of its base cache's tokens (so buffers hold what a prefill of that context leaves: the
compact cache is the expanded one cut to its first head_dim features, exactly the plain k, v that compact
mode stores, with the same anchors). Every variant then decodes `--steps` tokens (timed, per-step
milliseconds), interleaved, `--repeats` times after `--warmup` rounds, and the cache is rewound.
"overhead ms" is a variant's per-step time minus the baseline's in the same round; "overhead vs
plain-buffered ms" the same against plain-buffered (both sides without the torch.cat copies) and
"overhead vs plain-matched ms" against plain-matched.

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
    add_variants_argument,
    attn_implementations,
    build_models,
    cache_bytes,
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
from transformers import DynamicCache  # noqa: E402

from phantom_hf import PhantomCache  # noqa: E402
from phantom_hf.modeling.compat_phantom import cache_kwargs, cache_of  # noqa: E402

VARIANTS = ("plain", "plain-buffered", "plain-matched", "expanded", "expanded-cat", "compact", "compact-cat")
DEFAULT_VARIANTS = "plain,plain-buffered,plain-matched,expanded,expanded-cat,compact"
# variant -> the model (of common.model_specs) it decodes with
MODEL_OF = {name: "phantom" for name in VARIANTS} | {"plain": "plain", "plain-buffered": "plain", "plain-matched": "plain-packed"}
# variant -> the model whose prefill gives its base cache
FAMILY_OF = {name: "phantom" if model == "phantom" else "plain" for name, model in MODEL_OF.items()}


def copy_cache(base: Any, variant: str, head_dim: int) -> Any:
    """A new cache of `variant` holding `base`'s tokens (`base`: the plain DynamicCache for plain variants,
    the expanded PhantomCache for Phantom ones)."""
    family, _, kind = variant.partition("-")
    if family == "plain":
        cache = PhantomCache() if kind in ("buffered", "matched") else DynamicCache()
    else:
        cache = PhantomCache(mode=family)
        cache.anchors = dict(base.anchors)
    for layer_idx, layer in enumerate(base.layers):
        keys, values = layer.keys, layer.values
        if family == "compact":
            keys, values = keys[..., :head_dim], values[..., :head_dim]
        cache.update(keys.contiguous(), values.contiguous(), layer_idx)
    return with_stock_layers(cache) if kind == "cat" else cache


def decode_steps(model: Any, cache: Any, token: torch.Tensor, context: int, steps: int, device: torch.device) -> float:
    """Seconds per step of `steps` greedy decode steps after a cache of `context` tokens; rewinds the cache."""
    mask = torch.ones(token.shape[0], context + steps, dtype=torch.long, device=device)
    with torch.inference_mode(), Timer(device) as timer:
        for step in range(steps):
            out = model(
                input_ids=token,
                attention_mask=mask[:, : context + step + 1],
                **cache_kwargs(cache),
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
    add_variants_argument(parser, VARIANTS, DEFAULT_VARIANTS)
    args = parser.parse_args(argv)
    variants = selected_variants(parser, args, VARIANTS)
    baseline = variants[0]
    setup_runtime(args)
    device = torch.device(args.device)
    contexts = sorted({int(c) for c in args.contexts.split(",")}, reverse=True)
    text_config = text_config_from_args(args)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    print(f"shape: {shape_label(text_config)}; {args.dtype} on {device}; {machine_info(device)}", flush=True)

    rows: list[Row] = []
    for attn in attn_implementations(args):
        models = build_models(text_config, model_specs(attn), args.device, args.dtype, attn)
        generator = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(10, text_config.vocab_size, (args.batch, contexts[0]), generator=generator).to(device)
        token = prompt[:, -1:]
        with torch.inference_mode():
            bases = {
                family: cache_of(models[family](input_ids=prompt, use_cache=True, logits_to_keep=1))
                for family in sorted({FAMILY_OF[name] for name in variants})
            }
        current = contexts[0]
        for context in contexts:
            for base in bases.values():
                base.crop(context - current)
            current = context
            caches = {name: copy_cache(bases[FAMILY_OF[name]], name, head_dim) for name in variants}
            setting = f"{attn} b{args.batch} ctx{context}"
            samples = interleaved(
                variants,
                args.repeats,
                args.warmup,
                lambda name: {
                    "ms": 1000 * decode_steps(models[MODEL_OF[name]], caches[name], token, context, args.steps, device)
                },
            )
            new_rows = [Row(setting, name, "step ms", samples[name]["ms"], False, baseline) for name in variants]
            reference = "expanded" if "expanded" in variants else baseline
            for against, metric in (
                (baseline, "overhead ms"),
                ("plain-buffered", "overhead vs plain-buffered ms"),
                ("plain-matched", "overhead vs plain-matched ms"),
            ):
                if against not in variants:
                    continue
                for name in variants:
                    if FAMILY_OF[name] == "plain":
                        continue
                    overhead = [a - b for a, b in zip(samples[name]["ms"], samples[against]["ms"])]
                    new_rows.append(Row(setting, name, metric, overhead, False, reference))
            for name in variants:
                sizes = cache_bytes(caches[name])
                for metric, part in (("cache MiB", "key_value"), ("reserved MiB", "reserved")):
                    mib = (sizes[part] + sizes["anchors"]) / 2**20
                    new_rows.append(Row(setting, name, metric, [mib], False, baseline, extra=sizes))
            rows += new_rows
            print(format_table(new_rows, setting), flush=True)
            del caches
        del models, bases

    title = f"cache: {shape_label(text_config)}; {args.dtype} on {device}; {args.steps} steps x {args.repeats} repeats"
    report("cache", title, rows, args, device)
    return rows


if __name__ == "__main__":
    main()
