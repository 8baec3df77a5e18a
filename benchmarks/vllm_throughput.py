"""Offline throughput of Phantom served by vLLM against transformers' `generate`, and Phantom against the plain
backbone in vLLM.

`--prompts` concurrent prompts of `--prompt-tokens` random tokens each, `--new-tokens` greedy tokens each (no early
stop). Variants (`--variants`, the first is the baseline):
  hf-plain, hf-phantom      transformers' `generate` on the whole batch (Phantom Dimension off / on, PhantomCache);
  vllm-plain, vllm-phantom  vLLM's offline engine (`vllm.LLM(...).generate`) on the same prompts, from folders written
                            by `save_pretrained` (prefix caching off, so that every repeat prefills; eager).
All four share the same random backbone tensors (Phantom's modules are extra). Metrics: generated tokens per second
(prompts x new tokens / seconds of the whole call, prefill included), by the wall clock and by the CPU time of this
process (vLLM runs in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0). Runs in the vLLM environment (README, "Serving
with vLLM"); on the CPU vLLM's worker binds its threads to `--threads` cores and transformers then runs with the same
threads.

    python benchmarks/vllm_throughput.py --threads 1 --repeats 3 --json vllm-cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Row,
    add_model_arguments,
    add_variants_argument,
    build_models,
    interleaved,
    machine_info,
    report,
    selected_variants,
    shape_label,
    text_config_from_args,
)
from phantom_hf.modeling.processing_phantom import PhantomProcessor  # noqa: E402
from phantom_hf.tokenization import build_tokenizer  # noqa: E402

VARIANTS = ("hf-plain", "hf-phantom", "vllm-plain", "vllm-phantom")
# A small decoder (the CPU default): the shape of a Phantom layer (GQA 4:1, head_dim 64, so 128 for Phantom
# attention) at a size where a CPU run takes minutes.
SMALL_SHAPE = dict(layers=8, hidden_size=512, heads=8, kv_heads=2, head_dim=64, intermediate_size=2048, vocab_size=32000)


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(**SMALL_SHAPE)
    parser.add_argument("--prompts", type=int, default=8, help="concurrent prompts")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    add_variants_argument(parser, VARIANTS, ",".join(VARIANTS))
    return parser, parser.parse_args()


def save_folder(model: Any, vocab_size: int, folder: Path) -> Path:
    """`save_pretrained` of the model with a word-level tokenizer of its vocabulary and a processor (what vLLM loads)."""
    tokenizer = build_tokenizer([f"t{index}" for index in range(vocab_size - 40)])
    model.save_pretrained(folder)
    PhantomProcessor.from_config(model.config, tokenizer).save_pretrained(folder)
    return folder


def main() -> None:
    parser, args = parse_args()
    variants = selected_variants(parser, args, VARIANTS)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    torch.manual_seed(args.seed)
    if device.type == "cpu" and args.threads:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}" if args.threads > 1 else "0")
        torch.set_num_threads(args.threads)
    text = text_config_from_args(args)
    models = build_models(text, {"phantom": dict(phantom_dimension=True), "plain": dict(phantom_dimension=False)}, args.device, dtype, "sdpa")
    for model in models.values():
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(50, text.vocab_size, (args.prompts, args.prompt_tokens), generator=generator)

    engines: dict[str, Any] = {}
    folders = tempfile.TemporaryDirectory(prefix="phantom-vllm-bench-")
    if any(name.startswith("vllm") for name in variants):
        from vllm import LLM, SamplingParams

        sampling = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
        token_prompts = [{"prompt_token_ids": row.tolist()} for row in prompts]
        for name in variants:
            if name.startswith("vllm"):
                kind = name.split("-")[1]
                folder = save_folder(models[kind], text.vocab_size, Path(folders.name) / kind)
                engines[name] = LLM(
                    model=str(folder),
                    dtype=dtype,
                    max_model_len=args.prompt_tokens + args.new_tokens + 16,
                    max_num_seqs=max(args.prompts, 1),
                    max_num_batched_tokens=max(args.prompts * args.prompt_tokens, 2048),
                    enable_prefix_caching=False,
                    enforce_eager=True,
                    limit_mm_per_prompt={"image": 0},
                    seed=args.seed,
                )

    def run(name: str) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        if name in engines:
            outputs = engines[name].generate(token_prompts, sampling, use_tqdm=False)
            generated = sum(len(output.outputs[0].token_ids) for output in outputs)
        else:
            with torch.no_grad():
                output = models[name.split("-")[1]].generate(
                    input_ids=prompts.to(device),
                    attention_mask=torch.ones_like(prompts).to(device),
                    do_sample=False,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                )
            generated = (output.shape[1] - args.prompt_tokens) * output.shape[0]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if generated != args.prompts * args.new_tokens:
            raise RuntimeError(f"{name} generated {generated} tokens, expected {args.prompts * args.new_tokens}")
        return {"tokens/s (wall)": generated / wall, "tokens/s (cpu time)": generated / cpu}

    samples = interleaved(variants, args.repeats, args.warmup, run)
    setting = f"{args.prompts} prompts x {args.prompt_tokens} + {args.new_tokens} tokens"
    rows = [
        Row(setting, name, metric, values, True, variants[0])
        for name in variants
        for metric, values in samples[name].items()
    ]
    rows.sort(key=lambda row: (row.metric, variants.index(row.variant)))
    import vllm

    info = {**machine_info(device), "vllm": vllm.__version__, "threads": torch.get_num_threads()}
    print(f"\nmodel: {shape_label(text)}, {dtype}; {info}")
    report("vllm_throughput", f"Offline generation throughput ({setting})", rows, args, device)
    folders.cleanup()


if __name__ == "__main__":
    main()
