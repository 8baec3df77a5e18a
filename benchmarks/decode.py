"""Decoding speed with Phantom Dimension off (the plain backbone) vs on, at a real model shape, eager and compiled.

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

Static-cache variants (preallocated keys/values of context + new tokens + 1 slots, what compiled decoding
needs): `plain-static` (transformers' StaticCache), `phantom-static` (PhantomStaticCache, expanded), and
their compiled forms `plain-compiled`, `plain-matched-compiled` (the packed decode attention, as
plain-matched) and `phantom-compiled`, and `phantom-fused-compiled` (Phantom with the decode step's MHCA and fold in
the fused forms of `fused_forms.py`, a candidate for GPUs): `torch.compile(model.forward)` (inductor; `--compile-mode`, `--compile-backend`)
runs every decode step after an eager prefill, the way `generate(cache_implementation="static")` compiles
on a GPU. The compile happens in the warm-up round (its time is printed, not measured). Each compiled variant's
tokens are checked against its eager static form's when both run.

Besides tokens/s every variant reports the bytes a decode step reads (decoder and LM-head weights once, plus
all the keys/values its attention reads: the filled part of a dynamic cache, every slot of a static one)
and the rate it reads them at (GB/s): at batch 1 a step is bound by that traffic, so plain bytes / Phantom
bytes is the ceiling of the Phantom/plain ratio.

    python benchmarks/decode.py                       # Qwen2-0.5B shape, the CPU default grid
    python benchmarks/decode.py --settings 1x1024 --repeats 5 --json decode.json
    python benchmarks/decode.py --settings 1x1024 --variants plain-compiled,phantom-compiled,plain,phantom
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import StaticCache

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
    write_rows,
)
from fused_forms import use_fused_forms  # noqa: E402
from phantom_hf import PhantomCache, PhantomStaticCache  # noqa: E402
from phantom_hf.modeling.compat_phantom import cache_kwargs, cache_of  # noqa: E402

# variant -> the model (of common.model_specs) it decodes with; new_cache gives its cache
MODEL_OF = {
    "plain": "plain",
    "phantom": "phantom",
    "phantom-cat": "phantom",
    "plain-buffered": "plain",
    "plain-matched": "plain-packed",
    "plain-static": "plain",
    "phantom-static": "phantom",
    "plain-compiled": "plain",
    "plain-matched-compiled": "plain-packed",
    "phantom-compiled": "phantom",
    "phantom-fused-compiled": "phantom-fused",
}
VARIANTS = tuple(MODEL_OF)
# compiled variant -> the eager variant whose tokens it must reproduce
EAGER_OF = {"plain-compiled": "plain-static", "phantom-compiled": "phantom-static", "phantom-fused-compiled": "phantom-static"}


def is_static(variant: str) -> bool:
    return variant.endswith(("-static", "-compiled"))


def new_cache(variant: str, model: Any = None, max_cache_len: int = 0) -> Any:
    """The empty cache a variant prefills into (None: the model's default)."""
    if variant == "phantom-cat":
        return with_stock_layers(PhantomCache())
    if variant in ("plain-buffered", "plain-matched"):
        return PhantomCache()
    if is_static(variant):
        cache_class = PhantomStaticCache if model.config.phantom_dimension else StaticCache
        return cache_class(model.config.text_config, max_cache_len=max_cache_len)
    return None


def weight_bytes(model: Any) -> int:
    """Bytes of the weights a decode step reads: the decoder's (without the embedding table, of which it reads
    one row per token) and the LM head's."""
    embedding = model.get_input_embeddings().weight
    tensors = {id(t): t for t in model.language_model.parameters() if t is not embedding}
    tensors[id(model.lm_head.weight)] = model.lm_head.weight
    return sum(t.numel() * t.element_size() for t in tensors.values())


def cache_read_bytes(cache: Any) -> int:
    """Bytes of keys/values (and anchors) a decode step's attention reads from `cache`: the filled tokens of a
    dynamic cache, every slot of a static one (the mask hides the empty ones, the kernels still read them)."""
    total = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    anchors = getattr(cache, "anchors", None) or getattr(cache, "anchor_buffers", {})
    return total + sum(t.numel() * t.element_size() for pair in anchors.values() for t in pair)


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
    """A model's prefilled cache for one setting, from which decoding can be repeated.

    Runs under `torch.no_grad()`, as `generate` does: a cache filled under `torch.inference_mode()` holds
    inference tensors, which CUDA-graph replays (torch.compile's "reduce-overhead") may not update in place.

    With a static cache every decode step gets a 2D mask over all `max_cache_len` slots (ones up to the
    current token), so its inputs keep one shape from step to step: a compiled `forward` runs one graph.
    """

    def __init__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        timer_device: torch.device,
        cache: Any = None,
        forward: Callable | None = None,
    ) -> None:
        self.model = model
        self.forward = forward or model
        self.device = timer_device
        self.context = input_ids.shape[1]
        length = self.context + max_new_tokens + 1
        self.static = isinstance(cache, StaticCache)
        self.mask = torch.ones(input_ids.shape[0], length, dtype=torch.long, device=input_ids.device)
        if self.static:  # one full-length mask per step
            self.step_masks = [self.mask.clone() for _ in range(max_new_tokens)]
            for step, mask in enumerate(self.step_masks):
                mask[:, self.context + step + 1 :] = 0
        with torch.no_grad(), Timer(timer_device) as timer:
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
        self.tokens: list[list[int]] = []
        self.read_bytes = weight_bytes(model) + cache_read_bytes(self.cache)

    def decode(self, new_tokens: int) -> float:
        """Greedy-decode `new_tokens` tokens after the prefix; returns seconds. Leaves the cache at the prefix."""
        token, tokens = self.first_token, []
        with torch.no_grad(), Timer(self.device) as timer:
            for step in range(new_tokens):
                mask = self.step_masks[step] if self.static else self.mask[:, : self.context + step + 1]
                out = self.forward(
                    input_ids=token,
                    attention_mask=mask,
                    **cache_kwargs(self.cache),
                    use_cache=True,
                    logits_to_keep=1,
                )
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
        self.cache.crop(-new_tokens)
        self.tokens = torch.cat(tokens, dim=1).tolist()
        return timer.seconds


def compiled_forwards(models: dict[str, Any], names: list[str], mode: str | None, backend: str = "inductor") -> dict[str, Callable]:
    """`torch.compile(model.forward)` for each model a compiled variant decodes with, as one graph where the
    backbone allows (`full_graph`).

    Every (model, setting) compiles its own static-shape graph: automatic dynamic shapes are off (a second
    context length would otherwise turn the graph dynamic) and the recompile limit is raised for the variants
    and settings of one run.
    """
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    wanted = {MODEL_OF[name] for name in names if name.endswith("-compiled")}
    return {key: torch.compile(models[key].forward, fullgraph=full_graph(models[key]), mode=mode, backend=backend) for key in wanted}


def full_graph(model: Any) -> bool:
    """Whether a decode step compiles to one graph: not with dynamic-NTK rope (the InternLM2 backbones of
    phantom-1.8b and phantom-7b), whose frequency update in transformers branches on the position, a graph break
    by design; `generate` compiles with `fullgraph=False` by default for the same reason."""
    text = model.config.text_config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    return "dynamic" not in str(rope.get("rope_type", ""))


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--settings", type=parse_settings, default=None, help="batch x context list (default: per device)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per measured repeat")
    parser.add_argument("--repeats", type=int, default=3, help="measured decode repeats per variant and setting")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured decode rounds before the repeats (compiled variants compile in the first)")
    parser.add_argument("--prefill-repeats", type=int, default=1, help="measured prefills per variant and setting (a short warm-up call precedes all)")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode of the compiled variants (default: inductor's default; on CUDA try reduce-overhead: CUDA graphs)"
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compiled variants ('eager': dynamo's graph capture only, for a quick check)"
    )
    add_variants_argument(parser, VARIANTS, "plain,phantom")
    args = parser.parse_args(argv)
    names = selected_variants(parser, args, VARIANTS)
    if any(name.endswith("-compiled") for name in names) and args.warmup < 1:
        parser.error("compiled variants compile in the first warm-up round: --warmup must be >= 1")
    baseline = names[0]
    setup_runtime(args)
    device = torch.device(args.device)
    settings = args.settings or parse_settings(DEFAULT_SETTINGS["cuda" if device.type == "cuda" else "cpu"])
    text_config = text_config_from_args(args)
    print(f"shape: {shape_label(text_config)}; {args.dtype} on {device}; {machine_info(device)}", flush=True)

    rows: list[Row] = []
    for attn in attn_implementations(args):
        specs = model_specs(attn)
        if "phantom-fused-compiled" in names:  # Phantom again on the same tensors, its decode step in fused forms
            specs["phantom-fused"] = specs["phantom"]
        models = build_models(text_config, specs, args.device, args.dtype, attn)
        if "phantom-fused" in models:
            use_fused_forms(models["phantom-fused"])
        forwards = compiled_forwards(models, names, args.compile_mode, args.compile_backend)
        for name in names:  # first-call costs (allocator, kernel selection) stay out of the measurements
            if name.endswith("-compiled"):
                continue  # compiled in the setting's own warm-up round, at its own shapes
            model = models[MODEL_OF[name]]
            warm = torch.ones(1, 16, dtype=torch.long, device=device)
            DecodeState(model, warm, 2, device, new_cache(name, model, 16 + 3)).decode(2)
        for batch, context in settings:
            setting = f"{attn} b{batch} ctx{context}"
            generator = torch.Generator().manual_seed(args.seed)
            input_ids = torch.randint(10, text_config.vocab_size, (batch, context), generator=generator).to(device)
            states: dict[str, DecodeState] = {}
            prefill: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(args.prefill_repeats):
                for name in names:
                    states.pop(name, None)
                    model = models[MODEL_OF[name]]
                    cache = new_cache(name, model, context + args.new_tokens + 1)
                    forward = forwards[MODEL_OF[name]] if name.endswith("-compiled") else None
                    state = DecodeState(model, input_ids, args.new_tokens, device, cache, forward)
                    prefill[name].append(state.prefill_seconds)
                    states[name] = state
            first_round: dict[str, float] = {}

            def run(name: str) -> dict[str, float]:
                started = time.perf_counter()
                seconds = states[name].decode(args.new_tokens)
                first_round.setdefault(name, time.perf_counter() - started)
                steps_per_second = args.new_tokens / seconds
                return {"tokens/s": batch * steps_per_second, "GB/s": states[name].read_bytes * steps_per_second / 1e9}

            samples = interleaved(names, args.repeats, args.warmup, run)
            for name in names:
                if name.endswith("-compiled"):
                    print(f"{setting} {name}: first (compiling) round {first_round[name]:.1f} s wall", flush=True)
                eager = EAGER_OF.get(name)
                if eager in states:
                    same = states[name].tokens == states[eager].tokens
                    print(f"{setting} {name}: tokens equal {eager}'s: {same}", flush=True)
                    if not same:
                        print(f"  {name}: {states[name].tokens}\n  {eager}: {states[eager].tokens}", flush=True)
            for name in names:
                rows.append(Row(setting, name, "decode tokens/s", samples[name]["tokens/s"], True, baseline))
            for name in names:
                step_mb = states[name].read_bytes / 1e6
                rows.append(Row(setting, name, "step reads MB", [step_mb], False, baseline))
            for name in names:
                rows.append(Row(setting, name, "read GB/s", samples[name]["GB/s"], True, baseline))
            for name in names:
                rows.append(Row(setting, name, "prefill s", prefill[name], False, baseline))
            print(format_table(rows[-4 * len(names) :], setting), flush=True)
            if args.json:
                write_rows("decode", rows, args, device, complete=False)
        del models, forwards

    title = f"decode: {shape_label(text_config)}; {args.dtype} on {device}; {args.new_tokens} new tokens x {args.repeats} repeats"
    report("decode", title, rows, args, device)
    return rows


if __name__ == "__main__":
    main()
