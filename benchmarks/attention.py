"""Decode-step attention (one query token per row) over grouped key/value heads, in the three forms SDPA can be
called with, at the head size of the plain backbone (head_dim) and of Phantom attention (2 x head_dim).

Forms (`--variants`, the first is the baseline):
  enable_gqa  `scaled_dot_product_attention(..., enable_gqa=True)`: what transformers' `sdpa` passes when no
              mask is needed, i.e. every decode step of an unpadded batch (the plain backbone's decode);
  packed      the query heads of each key/value group packed into the query-length axis,
              (B, H, 1, D) -> (B, H_kv, H/H_kv, D), no repeat: `sdpa_packed_gqa_decode`, what Phantom attention
              runs for sdpa decode steps on CPU;
  repeat_kv   keys/values repeated to H heads first (transformers' fallback with a mask on older releases).

One measurement is a decode step's attention over all layers: every layer has its own keys/values (so they come
from memory, as in the model, not from the CPU caches), shape (B, H_kv, context, head size). Head counts and
layers come from the model shape (phantom-0.5b's decoder by default: 24 layers, 14 query / 2 key-value heads,
head_dim 64). Every form is checked against enable_gqa before timing.

    python benchmarks/attention.py --threads 1 --clock process
    python benchmarks/attention.py --contexts 1024 --repeats 15 --json attention.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Row,
    Timer,
    add_model_arguments,
    add_variants_argument,
    format_table,
    interleaved,
    machine_info,
    report,
    selected_variants,
    setup_runtime,
    shape_label,
    text_config_from_args,
)
from phantom_hf.modeling.modeling_phantom import sdpa_packed_gqa_decode  # noqa: E402

VARIANTS = ("enable_gqa", "packed", "repeat_kv")
AttentionForm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_forms(groups: int) -> dict[str, AttentionForm]:
    """Each form as query (B, H, 1, D), keys, values (B, H_kv, N, D) -> output (B, H, 1, D)."""

    def enable_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, key, value, enable_gqa=True)

    def packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        output, _ = sdpa_packed_gqa_decode(None, query, key, value, None)
        return output.transpose(1, 2)

    def repeat_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(query, key, value)

    return {"enable_gqa": enable_gqa, "packed": packed, "repeat_kv": repeat_kv}


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--contexts", default="256,1024,2048,4096", help="cached tokens, comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=10, help="decode steps (all layers each) per measurement")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    add_variants_argument(parser, VARIANTS, ",".join(VARIANTS))
    args = parser.parse_args(argv)
    names = selected_variants(parser, args, VARIANTS)
    setup_runtime(args)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    text = text_config_from_args(args)
    heads, kv_heads, layers = text.num_attention_heads, text.num_key_value_heads, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    forms = attention_forms(heads // kv_heads)
    print(f"shape: {shape_label(text)}; {args.dtype} on {device}; {machine_info(device)}", flush=True)

    rows: list[Row] = []
    for context in [int(c) for c in args.contexts.split(",")]:
        for size, label in ((head_dim, "plain"), (2 * head_dim, "phantom")):
            setting = f"b{args.batch} ctx{context} head size {size} ({label})"
            generator = torch.Generator().manual_seed(args.seed)
            query = torch.randn(args.batch, heads, 1, size, generator=generator).to(device, dtype)
            cache = [
                (
                    torch.randn(args.batch, kv_heads, context, size, generator=generator).to(device, dtype),
                    torch.randn(args.batch, kv_heads, context, size, generator=generator).to(device, dtype),
                )
                for _ in range(layers)
            ]
            expected = forms["enable_gqa"](query, *cache[0])
            for name in names:
                torch.testing.assert_close(forms[name](query, *cache[0]), expected, rtol=1e-3, atol=1e-3)

            def run(name: str) -> dict[str, float]:
                form = forms[name]
                with torch.inference_mode(), Timer(device) as timer:
                    for _ in range(args.calls):
                        for key, value in cache:
                            form(query, key, value)
                return {"ms": 1000 * timer.seconds / args.calls}

            samples = interleaved(names, args.repeats, args.warmup, run)
            new_rows = [Row(setting, name, f"ms per step ({layers} layers)", samples[name]["ms"], False, names[0]) for name in names]
            rows += new_rows
            print(format_table(new_rows, setting), flush=True)
            del cache

    title = f"attention: decode step, {layers} layers, {heads} q / {kv_heads} kv heads; {args.dtype} on {device}; {args.calls} steps x {args.repeats} repeats"
    report("attention", title, rows, args, device)
    return rows


if __name__ == "__main__":
    main()
