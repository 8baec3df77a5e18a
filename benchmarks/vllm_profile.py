"""Where a vLLM decode step's time goes, Phantom against the plain backbone: torch.profiler self time per operator,
decode passes only.

Both engines (vLLM's offline engine in this process, compiled path, prefix caching off, the same random backbone as
`vllm_throughput.py`) generate `--new-tokens` greedy tokens for `--prompts` prompts of `--prompt-tokens` random tokens
under the profiler, rounds interleaved after one warm-up call each. Every model forward is marked as a decode pass
(one token per prompt) or not, and only operators that run inside a decode pass are counted: a whole call's profile
is dominated by the prefill, whose matrix products behave differently. Inductor's kernels are timed one by one
(`TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1`). Prints, per operator, the self milliseconds per decode pass of both
models and their difference, the largest first; the profiler's own cost per operator is in both columns.

    python benchmarks/vllm_profile.py --threads 1 --prompts 16 --repeats 4 --json vllm-profile.json
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

# inductor reads this when torch loads it; vLLM's own settings (in-process engine, KV space) come with vllm_throughput
os.environ.setdefault("TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_arguments, build_models, machine_info, shape_label, text_config_from_args  # noqa: E402
from vllm_throughput import bind_cpu_threads, offline_engine, save_folder  # noqa: E402

DECODE = "phantom_hf_decode_pass"


def mark_decode_passes(model: torch.nn.Module, prompts: int) -> None:
    """Run every forward of one token per prompt inside a profiler range named `DECODE`."""
    forward = model.forward

    def marked(*args: Any, **kwargs: Any) -> Any:
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        if positions.shape[-1] != prompts:
            return forward(*args, **kwargs)
        with record_function(DECODE):
            return forward(*args, **kwargs)

    model.forward = marked


def operator_name(name: str) -> str:
    """The profiler's name of an operator, without what differs between two engines' compiled graphs (the graph's
    hash, the `graph_<n>_` prefix of inductor's kernels)."""
    if name.startswith("## Call CompiledFxGraph"):
        return "## Call CompiledFxGraph ##"
    return re.sub(r"^graph_\d+_", "", name)


def decode_self_times(prof: Any) -> tuple[dict[str, float], int]:
    """Self microseconds per operator name inside decode passes, and the number of decode passes."""
    events = prof.events()
    spans = sorted((event.time_range.start, event.time_range.end) for event in events if event.name == DECODE)
    starts = [start for start, _ in spans]
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        index = bisect.bisect_right(starts, event.time_range.start) - 1
        if event.name != DECODE and index >= 0 and event.time_range.end <= spans[index][1]:
            totals[operator_name(event.name)] += event.self_cpu_time_total
    return totals, len(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=4, help="profiled calls per engine")
    parser.add_argument("--top", type=int, default=30, help="operators printed")
    parser.add_argument("--json", dest="out", default=None, help="also write the per-pass times as JSON")
    args = parser.parse_args()
    if args.device != "cpu":
        parser.error("the profile reads CPU self times: run it on the CPU")
    bind_cpu_threads(args.threads)
    from vllm import SamplingParams

    text = text_config_from_args(args)
    models = build_models(text, {"phantom": dict(phantom_dimension=True), "plain": dict(phantom_dimension=False)}, "cpu", "float32", "sdpa")
    folders = tempfile.TemporaryDirectory(prefix="phantom-vllm-profile-")
    engines = {}
    for kind in ("plain", "phantom"):
        folder = save_folder(models.pop(kind), text.vocab_size, Path(folders.name) / kind)
        engines[kind] = offline_engine(folder, "float32", args, args.prompts)
        engines[kind].apply_model(lambda model: mark_decode_passes(model, args.prompts))
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(50, text.vocab_size, (args.prompts, args.prompt_tokens), generator=generator)
    requests = [{"prompt_token_ids": row.tolist()} for row in prompts]
    sampling = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    totals = {kind: collections.defaultdict(float) for kind in engines}
    passes = dict.fromkeys(engines, 0)
    for engine in engines.values():
        engine.generate(requests, sampling, use_tqdm=False)
    for _ in range(args.repeats):
        for kind, engine in engines.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.generate(requests, sampling, use_tqdm=False)
            times, count = decode_self_times(prof)
            for name, microseconds in times.items():
                totals[kind][name] += microseconds
            passes[kind] += count
    per_pass = {kind: {name: value / 1e3 / passes[kind] for name, value in totals[kind].items()} for kind in engines}
    plain, phantom = per_pass["plain"], per_pass["phantom"]
    print(f"\nmodel: {shape_label(text)}; {machine_info(torch.device('cpu'))}")
    print(f"decode passes: {passes['plain']} plain, {passes['phantom']} phantom ({args.prompts} prompts)")
    print(f"\n| operator (self ms per decode pass) | plain | phantom | difference |\n|---|---:|---:|---:|")
    print(f"| all | {sum(plain.values()):.2f} | {sum(phantom.values()):.2f} | {sum(phantom.values()) - sum(plain.values()):.2f} |")
    names = sorted(set(plain) | set(phantom), key=lambda name: -abs(phantom.get(name, 0) - plain.get(name, 0)))
    for name in names[: args.top]:
        print(f"| {name[:90]} | {plain.get(name, 0):.3f} | {phantom.get(name, 0):.3f} | {phantom.get(name, 0) - plain.get(name, 0):.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "passes": passes, "ms_per_decode_pass": per_pass}, indent=1))
    folders.cleanup()


if __name__ == "__main__":
    main()
