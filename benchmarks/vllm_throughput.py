"""Offline throughput of Phantom served by vLLM against transformers' `generate`, and Phantom against the plain
backbone in vLLM.

For each batch size of `--prompts` (default 1 and 16): that many concurrent prompts of `--prompt-tokens` random
tokens, `--new-tokens` greedy tokens each (no early stop). Variants (`--variants`, the first is the baseline):
  hf-plain, hf-phantom      transformers' `generate` on the whole batch (Phantom Dimension off / on, PhantomCache);
  vllm-plain, vllm-phantom  vLLM's offline engine (`vllm.LLM(...).generate`) on the same prompts, from folders written
                            by `save_pretrained` (prefix caching off, so that every repeat prefills); vLLM's compiled
                            path (torch.compile; CUDA graphs on a GPU) unless `--eager`.
All four share the same random backbone tensors (Phantom's modules are extra). Metrics, by the wall clock and by the
CPU time of this process (vLLM runs in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0): decode tokens/s (the
difference between a run of `--new-tokens` and a run of 1 new token, both measured in every round: prompts x
(new tokens - 1) / the extra seconds), tokens/s of the whole call (prefill included), and, for the vLLM variants,
decode step tokens/s of the model's forward alone (prompts / the median forward time of the call's decode steps:
without the LM head, sampler and scheduler, which are the same for both models, and steadier than a difference of
two calls). Every round runs every
variant and batch size in turn. Runs in the vLLM environment (README, "Serving with vLLM"); on the CPU vLLM's worker
binds its threads to `--threads` cores and transformers then runs with the same threads. Default shape: Qwen2-0.5B's
(Phantom-0.5B's decoder).

    python benchmarks/vllm_throughput.py --threads 1 --clock process --repeats 3 --variants vllm-plain,vllm-phantom
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    Timer,
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


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompts", default="1,16", help="batch sizes (concurrent prompts), comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="vLLM's eager path (enforce_eager) instead of the compiled one")
    add_variants_argument(parser, VARIANTS, ",".join(VARIANTS))
    return parser, parser.parse_args()


def time_forwards(model: torch.nn.Module, records: list[tuple[int, float]]) -> None:
    """Make every forward pass of a vLLM model append (tokens in the pass, seconds) to `records`, timed with the
    benchmark's clock (`Timer`): a decode step's model time, without the scheduler, sampler and output handling that
    a whole call's time also holds (and whose noise the difference of two calls adds up)."""
    forward = model.forward

    def timed(*args: Any, **kwargs: Any) -> Any:
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        with Timer(positions.device) as timer:
            output = forward(*args, **kwargs)
        records.append((positions.shape[-1], timer.seconds))
        return output

    model.forward = timed


def save_folder(model: Any, vocab_size: int, folder: Path) -> Path:
    """`save_pretrained` of the model with a word-level tokenizer of its vocabulary and a processor (what vLLM loads)."""
    tokenizer = build_tokenizer([f"t{index}" for index in range(vocab_size - 40)])
    model.save_pretrained(folder)
    PhantomProcessor.from_config(model.config, tokenizer).save_pretrained(folder)
    return folder


def offline_engine(folder: Path, dtype: str, args: argparse.Namespace, max_seqs: int, eager: bool = False) -> Any:
    """vLLM's offline engine on a saved folder, as both vLLM benchmarks run it: text only, prefix caching off (every
    call prefills), room for `max_seqs` prompts of `--prompt-tokens` + `--new-tokens`."""
    from vllm import LLM

    return LLM(
        model=str(folder),
        dtype=dtype,
        max_model_len=args.prompt_tokens + args.new_tokens + 16,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=max(max_seqs * args.prompt_tokens, 2048),
        enable_prefix_caching=False,
        enforce_eager=eager,
        limit_mm_per_prompt={"image": 0},
        seed=args.seed,
    )


def bind_cpu_threads(threads: int | None) -> None:
    """Run torch and vLLM's CPU worker on `threads` threads bound to cores 0.. (vLLM reads the binding when an engine
    starts, so this comes before the first one)."""
    if threads:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
        torch.set_num_threads(threads)


def main() -> None:
    parser, args = parse_args()
    variants = selected_variants(parser, args, VARIANTS)
    batch_sizes = [int(size) for size in args.prompts.split(",")]
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    torch.manual_seed(args.seed)
    Timer.clock = args.clock
    if device.type == "cpu":
        bind_cpu_threads(args.threads)
    text = text_config_from_args(args)
    models = build_models(text, {"phantom": dict(phantom_dimension=True), "plain": dict(phantom_dimension=False)}, args.device, dtype, "sdpa")
    for model in models.values():
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(50, text.vocab_size, (max(batch_sizes), args.prompt_tokens), generator=generator)

    engines: dict[str, Any] = {}
    folders = tempfile.TemporaryDirectory(prefix="phantom-vllm-bench-")
    if any(name.startswith("vllm") for name in variants):
        from vllm import SamplingParams

        for name in variants:
            if name.startswith("vllm"):
                kind = name.split("-")[1]
                folder = save_folder(models[kind], text.vocab_size, Path(folders.name) / kind)
                engines[name] = offline_engine(folder, dtype, args, max(batch_sizes), args.eager)
                if f"hf-{kind}" not in variants:  # the engine holds its own copy of the weights
                    del models[kind]

    step_times: dict[str, list[tuple[int, float]]] = {name: [] for name in engines}
    for name, engine in engines.items():
        engine.apply_model(lambda model, name=name: time_forwards(model, step_times[name]))

    def generate(name: str, batch: int, new_tokens: int) -> tuple[float, float]:
        """(wall, CPU) seconds of one call that generates `new_tokens` for each of the first `batch` prompts."""
        wall, cpu = time.perf_counter(), time.process_time()
        if name in engines:
            sampling = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
            outputs = engines[name].generate([{"prompt_token_ids": row.tolist()} for row in prompts[:batch]], sampling, use_tqdm=False)
            generated = sum(len(output.outputs[0].token_ids) for output in outputs)
        else:
            with torch.no_grad():
                output = models[name.split("-")[1]].generate(
                    input_ids=prompts[:batch].to(device),
                    attention_mask=torch.ones_like(prompts[:batch]).to(device),
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                )
            generated = (output.shape[1] - args.prompt_tokens) * output.shape[0]
        if generated != batch * new_tokens:
            raise RuntimeError(f"{name} generated {generated} tokens, expected {batch * new_tokens}")
        return time.perf_counter() - wall, time.process_time() - cpu

    runs = [(name, batch) for batch in batch_sizes for name in variants]

    def run(key: str) -> dict[str, float]:
        name, batch = runs[int(key)]
        if name in step_times:
            step_times[name].clear()
        full_wall, full_cpu = generate(name, batch, args.new_tokens)
        decode_steps = [seconds for tokens, seconds in step_times.get(name, []) if tokens == batch]
        one_wall, one_cpu = generate(name, batch, 1)
        decoded = batch * (args.new_tokens - 1)
        step_metric = {"decode step tokens/s (model forward)": batch / statistics.median(decode_steps)} if decode_steps else {}
        return {
            **step_metric,
            "decode tokens/s (wall)": decoded / max(full_wall - one_wall, 1e-9),
            "decode tokens/s (cpu time)": decoded / max(full_cpu - one_cpu, 1e-9),
            "tokens/s (wall)": batch * args.new_tokens / full_wall,
            "tokens/s (cpu time)": batch * args.new_tokens / full_cpu,
        }

    samples = interleaved([str(index) for index in range(len(runs))], args.repeats, args.warmup, run)
    rows = []
    for index, (name, batch) in enumerate(runs):
        setting = f"{batch} x ({args.prompt_tokens} + {args.new_tokens})"
        rows += [Row(setting, name, metric, values, True, variants[0]) for metric, values in samples[str(index)].items()]
    rows.sort(key=lambda row: (row.metric, batch_sizes.index(int(row.setting.split(" ")[0])), variants.index(row.variant)))
    import vllm

    info = {**machine_info(device), "vllm": vllm.__version__, "threads": torch.get_num_threads(), "compiled": not args.eager}
    print(f"\nmodel: {shape_label(text)}, {dtype}; {info}")
    report("vllm_throughput", "Offline generation throughput (prompts x (prompt + new tokens))", rows, args, device)
    folders.cleanup()


if __name__ == "__main__":
    main()
