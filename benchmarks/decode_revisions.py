"""Decode steps of Phantom attention as the working tree computes it vs as another git revision did, in one run.

Performance work on Phantom attention changes methods of `PhantomAttentionMixin`; separate runs of `decode.py`
before and after a change are at the mercy of the machine's drift (medians of separate runs here differ by up to
~10 %, more than most such changes). This benchmark builds its models on the same tensors: the backbone with
Phantom's decode-path choices (`plain-matched`, as in decode.py: the baseline), Phantom as the working tree computes
it (`phantom`) and Phantom whose attention layers run the `PhantomAttentionMixin` methods of
`modeling/modeling_phantom.py` at `--base` (`phantom@base`; the rest of the model, the cache included, is the
working tree's), prefills each once and decodes with them interleaved (batch 1, greedy, `PhantomCache`). The tokens
of both Phantom variants must be equal. Besides the table, it prints the per-round difference of the two Phantom
variants' step times (median, min, max): the change's effect, paired round by round.

    python benchmarks/decode_revisions.py --base HEAD~1 --threads 1 --clock process --repeats 15
    python benchmarks/decode_revisions.py --base HEAD~3 --layers 24 --hidden-size 128 --intermediate-size 256 \\
        --vocab-size 1000 --context 64 --threads 1 --clock process     # a tiny width: per-layer overhead only
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Row,
    add_model_arguments,
    build_models,
    format_table,
    interleaved,
    machine_info,
    model_specs,
    report,
    setup_runtime,
    shape_label,
    text_config_from_args,
)
from decode import DecodeState  # noqa: E402
from phantom_hf import PhantomCache  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
# the methods of one decode step that a revision's `PhantomAttentionMixin` supplies
MIXIN_METHODS = ("forward", "_phantom_project", "_phantom_expand", "_phantom_fold", "_phantom_derived_weights")


def mixin_at_revision(revision: str) -> type:
    """`PhantomAttentionMixin` of `modeling/modeling_phantom.py` at `revision`, imported inside this package (its
    relative imports resolve to the working tree's modules)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{revision}:modeling/modeling_phantom.py"], cwd=REPOSITORY, check=True, capture_output=True, text=True
        ).stdout
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"--base {revision!r}: git cannot show modeling/modeling_phantom.py there: {error.stderr.strip()}") from None
    name = "phantom_hf.modeling._modeling_at_revision"
    module = types.ModuleType(name)
    module.__package__ = "phantom_hf.modeling"
    sys.modules[name] = module
    exec(compile(source, f"{revision}:modeling/modeling_phantom.py", "exec"), module.__dict__)
    return module.PhantomAttentionMixin


def run_revision_code(model: torch.nn.Module, mixin: type) -> None:
    """Make every Phantom attention layer of `model` run `mixin`'s decode-step methods (bound per instance). The
    layers keep the attributes the working tree's `init_phantom` set; a revision whose methods read others fails
    with an AttributeError naming it."""
    for layer in model.language_model.layers:
        for method in MIXIN_METHODS:
            setattr(layer.self_attn, method, types.MethodType(getattr(mixin, method), layer.self_attn))


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--base", default="HEAD~1", help="git revision whose Phantom attention code is compared")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens prefilled before decoding")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens decoded per measured round")
    parser.add_argument("--repeats", type=int, default=15, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    setup_runtime(args)
    device = torch.device(args.device)
    mixin = mixin_at_revision(args.base)
    text_config = text_config_from_args(args)
    print(f"shape: {shape_label(text_config)}; {args.dtype} on {device}; base {args.base}; {machine_info(device)}", flush=True)
    specs = model_specs("sdpa")
    specs = {"phantom": specs["phantom"], "phantom@base": specs["phantom"], "plain-matched": specs["plain-packed"]}
    models = build_models(text_config, specs, args.device, args.dtype, "sdpa")
    run_revision_code(models["phantom@base"], mixin)
    names = ["plain-matched", "phantom", "phantom@base"]
    input_ids = torch.randint(10, text_config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(args.seed))
    states = {name: DecodeState(models[name], input_ids.to(device), args.new_tokens, device, PhantomCache()) for name in names}

    def run(name: str) -> dict[str, float]:
        seconds = states[name].decode(args.new_tokens)
        return {"tokens/s": args.new_tokens / seconds, "ms/step": seconds / args.new_tokens * 1e3}

    samples = interleaved(names, args.repeats, args.warmup, run)
    same = states["phantom"].tokens == states["phantom@base"].tokens
    print(f"tokens of phantom and phantom@base equal: {same}", flush=True)
    if not same:
        raise SystemExit(f"phantom {states['phantom'].tokens} != phantom@base {states['phantom@base'].tokens}")
    setting = f"b1 ctx{args.context}"
    rows = [Row(setting, name, "decode tokens/s", samples[name]["tokens/s"], True, "plain-matched") for name in names]
    rows += [Row(setting, name, "ms/step", samples[name]["ms/step"], False, "plain-matched") for name in names]
    difference = [base - now for base, now in zip(samples["phantom@base"]["ms/step"], samples["phantom"]["ms/step"])]
    rows.append(Row(setting, "phantom@base - phantom", "ms/step, paired", difference, False, "phantom@base - phantom"))
    for name in ("phantom", "phantom@base"):
        paired = [base / mine for base, mine in zip(samples["plain-matched"]["ms/step"], samples[name]["ms/step"])]
        rows.append(Row(setting, name, "tokens/s vs plain-matched, paired", paired, True, name))
    print(format_table(rows, setting), flush=True)
    report("decode_revisions", f"decode: {shape_label(text_config)}; {args.dtype}; base {args.base}", rows, args, device)
    return rows


if __name__ == "__main__":
    main()
