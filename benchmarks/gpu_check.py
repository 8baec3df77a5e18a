"""Everything a CUDA machine should confirm about Phantom, in one command and one table.

    bash benchmarks/gpu_check.sh                      # on a CUDA machine: install, check, print, write JSON
    python benchmarks/gpu_check.py --dry-run          # every step at tiny size on the CPU (CI runs this)

Steps (each prints its rows as it ends; the final table holds them all):

- install: phantom-hf itself (`gpu_check.sh`, editable, no dependencies), then flash-attn and bitsandbytes from
  wheels (`--wheels DIR` first, then the package index) when they are not importable yet; a flash-attn wheel that
  does not load with the installed torch is removed again. vLLM goes to a virtual environment of its own (it pins
  its own torch) that sees this environment's packages. What could not be installed is skipped later, with pip's
  reason.
- attention: logits of tiny Phantom models at the head sizes of the published backbones, Qwen2 (64 -> 128), Phi-3
  (96 -> 192) and InternLM2-shaped (a Llama decoder with head size 128 -> 256), with `eager`, `sdpa` and
  `flash_attention_2`, in float32 and bfloat16, against the same model in float64 with eager attention on the CPU
  (the path `tests/test_modeling.py` holds to the paper's equations). Left-padded rows with images. The plain
  backbone's error in the same setting is printed beside Phantom's as a yardstick.
- generate: greedy and beam search over left-padded rows with images; the tokens of the default cache against the
  static cache and the static cache compiled (`CompileConfig(mode="reduce-overhead")`: CUDA graphs), float32.
- quantization: bitsandbytes int8 and nf4 on CUDA (`benchmarks/quantization.py`'s loading and speed pieces) at the
  phantom-0.5b shape: the Phantom modules stay unquantized in the compute dtype, Phantom's logits stay close to its
  bfloat16 logits, and the decode ratio to the plain backbone quantized the same way.
- decode: `benchmarks/decode.py` at the phantom-0.5b and phantom-1.8b shapes, batch 1 and 16, context 1024 and 4096,
  bfloat16, sdpa: plain, phantom, plain-matched eagerly, then plain-compiled and phantom-compiled with CUDA graphs
  (batch 1 and 16 at context 1024; the 1.8B shape at batch 1), and phantom-compiled against the fused-forms
  candidate (`fused_forms.py`) at batch 1. Last but vLLM: it takes the time left, runs go in order of value, and a
  run the budget stops keeps the settings it finished.
- vllm: the vLLM CUDA build (if it imports or installs) on a tiny Phantom folder with CUDA graphs on: its greedy
  tokens against transformers' (`tests/vllm/helpers.py`).

A value appears in the table only when it was measured in this run; a step or case that did not run shows
"skipped: <reason>". `--dry-run` runs every step at tiny size on the CPU (float32 and bfloat16, eager and sdpa; the
compile steps with torch.compile's "eager" backend), and reports the CUDA-only parts (flash-attention, CUDA graphs,
bitsandbytes' CUDA kernels, vLLM's CUDA build) as skipped. Results go to `--json` (default
`benchmarks/results/gpu-check-<device>.json`, beside the CPU results). The whole run is held to `--budget` seconds
(8 minutes by default): every step on a GPU runs in a process of its own with the time left, and what did not fit is
reported as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

# decode comes last but vllm: its runs take whatever time is left, each setting kept as it finishes
STEPS = ("install", "attention", "generate", "quantization", "decode", "vllm")
# Relative logit error (max |logits - reference| / max |reference| over the unpadded positions) allowed against
# the float64 reference. float32 on CUDA runs with TF32 off. bfloat16 keeps 8 bits of mantissa. These test models
# (eta = 1, large random Phantom weights) amplify rounding 6-9x over their plain backbone in float32 and bfloat16
# alike (H200: phi3 shape float32 3.2e-6 vs 4.9e-7, bfloat16 eager 0.068 vs 0.0076; at eta = 1e-4 Phantom's
# bfloat16 error is the backbone's, 0.0082 vs 0.0076 on the CPU), so bfloat16 is held to 0.1, not to the backbone's.
ATTENTION_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1}
# A quantized Phantom's relative logit error ||q - f|| / ||f|| against its bfloat16 self may exceed its plain
# backbone's, quantized the same way, by this factor at most. The errors themselves are those of quantizing a
# random-weight backbone (0.5B shape: int8 0.08, nf4 0.56-0.60 for plain and Phantom alike, CPU and H200).
QUANTIZATION_MARGIN = 1.1


@dataclass
class Check:
    """One line of the table: a measured value (or pass/fail of one), or a skip with its reason."""

    step: str
    case: str
    status: str  # "pass", "fail", "measured", "skipped", "error"
    value: Any = None
    detail: str = ""

    def result(self) -> str:
        if self.status in ("skipped", "error"):
            return f"{self.status}: {self.detail}"
        value = f"{self.value:.4g}" if isinstance(self.value, float) else str(self.value)
        return f"{value} ({self.detail})" if self.detail else value


def skipped(step: str, case: str, reason: str) -> Check:
    return Check(step, case, "skipped", None, reason)


def table(checks: list[Check]) -> str:
    lines = ["| step | case | result | status |", "|---|---|---|---|"]
    for check in checks:
        lines.append(f"| {check.step} | {check.case} | {check.result()} | {check.status} |")
    return "\n".join(lines)


def flash_attention_problem(device: torch.device, dtype: str) -> str | None:
    """Why flash_attention_2 cannot run here (None: it can)."""
    if device.type != "cuda":
        return "needs CUDA"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed (no wheel for this torch; see the install step)"
    if dtype == "float32":
        return "flash-attention runs float16/bfloat16 only"
    return None


# ---------------------------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------------------------


def pip_install(python: str, requirement: str, wheels: Path | None, timeout: float) -> tuple[bool, str]:
    """`pip install --only-binary :all: requirement` (from `wheels` first); (ok, pip's last lines)."""
    command = [python, "-m", "pip", "install", "--only-binary", ":all:", "--no-input", requirement]
    if wheels is not None and wheels.is_dir():
        command += ["--find-links", str(wheels)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"pip timed out after {timeout:.0f} s"
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip() and "WARNING" not in line]
    return result.returncode == 0, " / ".join(lines[-2:])


def loads(python: str, statement: str) -> tuple[bool, str]:
    """Run `statement` in `python`; (ok, its last line of output)."""
    result = subprocess.run([python, "-c", statement], capture_output=True, text=True)
    return result.returncode == 0, last_line(result.stdout if result.returncode == 0 else result.stderr)


def vllm_python(args: argparse.Namespace) -> Path:
    return Path(args.scratch) / "vllm-venv" / "bin" / "python"


def step_install(args: argparse.Namespace, device: torch.device) -> list[Check]:
    if args.dry_run or device.type != "cuda":
        reason = "dry run: installs nothing" if args.dry_run else "no CUDA device: nothing to install"
        return [skipped("install", name, reason) for name in ("flash-attn", "bitsandbytes", "vllm")]
    wheels = Path(args.wheels) if args.wheels else None
    checks = []
    for package, module, probe in (
        ("flash-attn", "flash_attn", "import flash_attn, flash_attn.flash_attn_interface as f; print(flash_attn.__version__)"),
        ("bitsandbytes", "bitsandbytes", "import bitsandbytes, torch; print(bitsandbytes.__version__, torch.cuda.is_available())"),
    ):
        if importlib.util.find_spec(module) is not None:
            ok, said = loads(sys.executable, probe)
            checks.append(Check("install", package, "measured" if ok else "error", said if ok else None, "already installed" if ok else said))
            continue
        ok, said = pip_install(sys.executable, package, wheels, timeout=120)
        if ok:
            ok, said = loads(sys.executable, probe)
            if not ok:
                subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", package], capture_output=True)
                said = f"the wheel does not load with torch {torch.__version__} (removed again): {said}"
        if ok:
            checks.append(Check("install", package, "measured", said, "installed"))
        else:
            checks.append(skipped("install", package, f"no wheel installs for torch {torch.__version__}: {said}"))
    ok, said = loads(sys.executable, "import vllm; print(vllm.__version__)")
    if ok:
        checks.append(Check("install", "vllm", "measured", said, "already installed"))
        return checks
    venv = vllm_python(args).parent.parent
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], capture_output=True)
    ok, said = pip_install(str(vllm_python(args)), "vllm>=0.32,<0.33", wheels, timeout=240)
    if ok:
        subprocess.run([str(vllm_python(args)), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], capture_output=True)
        ok, said = loads(str(vllm_python(args)), "import vllm; print(vllm.__version__)")
    if ok:
        checks.append(Check("install", "vllm", "measured", said, f"installed in {venv}"))
    else:
        shutil.rmtree(venv, ignore_errors=True)
        checks.append(skipped("install", "vllm", f"the vLLM CUDA build does not install here: {said}"))
    return checks


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------

# case -> tiny_text_config overrides (tests/conftest.py's make_model): the published head sizes, 2 layers
ATTENTION_BACKBONES = {
    "qwen2 head 64->128": dict(model_type="qwen2", hidden_size=256, num_attention_heads=4, num_key_value_heads=2),
    "phi3 head 96->192": dict(model_type="phi3", hidden_size=192, num_attention_heads=2, num_key_value_heads=2),
    "internlm2-shaped head 128->256": dict(model_type="llama", hidden_size=512, num_attention_heads=4, num_key_value_heads=1),
}


def attention_inputs(model: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two left-padded rows with one image each (tests/conftest.py's batch builder) and the mask of real tokens."""
    from tests.conftest import IMAGE_TOKEN_ID, left_padded_batch

    per_tile = model.config.image_seq_length
    input_ids, attention_mask = left_padded_batch([20, 14], seed=7)
    input_ids[0, 3 : 3 + per_tile] = IMAGE_TOKEN_ID
    input_ids[1, 8 : 8 + per_tile] = IMAGE_TOKEN_ID
    pixel_values = torch.randn(2, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values), attention_mask.bool()


def with_attention(model: Any, implementation: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A copy of `model` running `implementation`, on `device` in `dtype`."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = implementation
    config.text_config._attn_implementation = implementation
    clone = type(model)(config)
    clone.load_state_dict(model.state_dict())
    return clone.to(device=device, dtype=dtype).eval()


def step_attention(args: argparse.Namespace, device: torch.device) -> list[Check]:
    from tests.conftest import make_model

    checks = []
    for name, shape in ATTENTION_BACKBONES.items():
        # tests/conftest.py's tiny model (eta = 1, large random Phantom weights) at this backbone's head size, and
        # the plain backbone with the same weights
        text = dict(intermediate_size=256, **shape)
        models = {phantom: make_model(seed=0, phantom_dimension=phantom, text_config=text) for phantom in (True, False)}
        models[False].load_state_dict(models[True].state_dict(), strict=False)
        inputs, valid = attention_inputs(models[True])
        with torch.no_grad():
            expected = {phantom: model(**inputs).logits[valid] for phantom, model in models.items()}
        for dtype in ("float32", "bfloat16"):
            for implementation in ("eager", "sdpa", "flash_attention_2"):
                case = f"{name} {dtype} {implementation}"
                if implementation == "flash_attention_2" and (problem := flash_attention_problem(device, dtype)):
                    checks.append(skipped("attention", case, problem))
                    continue
                errors = {}
                for phantom, model in models.items():
                    run = with_attention(model, implementation, device, getattr(torch, dtype))
                    moved = {key: value.to(device) for key, value in inputs.items()}
                    moved["pixel_values"] = moved["pixel_values"].to(getattr(torch, dtype))
                    with torch.no_grad():
                        logits = run(**moved).logits[valid.to(device)].double().cpu()
                    errors[phantom] = float((logits - expected[phantom]).abs().max() / expected[phantom].abs().max())
                tolerance = ATTENTION_TOLERANCE[dtype]
                status = "pass" if errors[True] <= tolerance else "fail"
                detail = f"max relative logit error vs float64; plain backbone {errors[False]:.2g}; tolerance {tolerance:g}"
                checks.append(Check("attention", case, status, errors[True], detail))
    return checks


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------


def cudagraph_skips(counters: Any) -> int:
    """How often inductor fell back from CUDA graphs so far (reduce-overhead mode)."""
    return int(counters["inductor"].get("cudagraph_skips", 0))


def step_generate(args: argparse.Namespace, device: torch.device) -> list[Check]:
    import transformers
    from tests.conftest import generate_fixed_length, image_beam_batch, make_model
    from transformers import CompileConfig

    model = make_model(seed=3, dtype=torch.float32).to(device)
    input_ids, attention_mask, beams = image_beam_batch(model)
    pixel_values = beams.pop("pixel_values").to(device=device, dtype=torch.float32)
    if device.type == "cuda":
        compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
        compiled_label = "static + torch.compile(mode='reduce-overhead')"
    else:  # the same path through transformers, with dynamo's graph capture only (inductor on a CPU takes minutes)
        compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
        compile_config._compile_all_devices = True
        compiled_label = "static + torch.compile(backend='eager'; dry run: CUDA graphs need CUDA)"
    checks = []
    for setting, kwargs in (("greedy", dict(do_sample=False)), ("beams 2", beams)):
        kwargs = dict(kwargs, pixel_values=pixel_values)
        ids, mask = input_ids.to(device), attention_mask.to(device)
        default = generate_fixed_length(model, ids, mask, **kwargs)
        static = generate_fixed_length(model, ids, mask, cache_implementation="static", **kwargs)
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        graphs_before = counters["stats"]["unique_graphs"]
        skips_before = cudagraph_skips(counters)
        compiled = generate_fixed_length(model, ids, mask, cache_implementation="static", compile_config=compile_config, **kwargs)
        graphs = counters["stats"]["unique_graphs"] - graphs_before
        detail = f"{setting}, images, left-padded batch of 2, {static.shape[1] - ids.shape[1]} new tokens, float32"
        same = torch.equal(static, default)
        checks.append(Check("generate", f"{setting}: static cache = default cache", "pass" if same else "fail", same, detail))
        case = f"{setting}: {compiled_label} = default cache"
        if graphs == 0:  # transformers compiles the step of GenerationMixin._sample (greedy, sampling) only
            checks.append(skipped("generate", case, f"generate ran uncompiled: transformers {transformers.__version__} compiles no {setting} step"))
            continue
        skips = cudagraph_skips(counters) - skips_before
        detail += f"; {graphs} graph(s) compiled" + (f", CUDA graph skips {skips}" if device.type == "cuda" else "")
        same = torch.equal(compiled, default)
        checks.append(Check("generate", case, "pass" if same and not skips else "fail", same, detail))
    return checks


# ---------------------------------------------------------------------------------------------------------------
# decode (benchmarks/decode.py)
# ---------------------------------------------------------------------------------------------------------------

TINY_SHAPE = ["--layers", "2", "--hidden-size", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--intermediate-size", "128", "--vocab-size", "256"]


def decode_runs(args: argparse.Namespace, device: torch.device) -> list[tuple[str, list[str]]]:
    """(label, decode.py arguments) of every decode.py call of the check."""
    if args.dry_run:
        common = [*TINY_SHAPE, "--device", "cpu", "--threads", "1", "--new-tokens", "2", "--repeats", "1", "--settings", "1x16,2x16"]
        return [
            ("tiny eager", [*common, "--variants", "plain,phantom,plain-matched"]),
            ("tiny compiled", [*common, "--variants", "plain-compiled,phantom-compiled,phantom-fused-compiled", "--compile-backend", "eager"]),
        ]
    # in order of value (a compile takes about a minute per variant and setting): the 0.5B shape eager, compiled at
    # batch 1 with the fused-forms candidate (benchmarks/fused_forms.py), the 1.8B shape eager, then more compiled
    common = ["--dtype", "bfloat16", "--attn", "sdpa", "--new-tokens", "32", "--repeats", "3"]
    eager = ["--settings", "1x1024,16x1024,1x4096,16x4096", "--variants", "plain,phantom,plain-matched"]
    compiled = ["--variants", "plain-compiled,phantom-compiled", "--compile-mode", "reduce-overhead"]
    return [
        ("phantom-0.5b eager", ["--preset", "phantom-0.5b", *common, *eager]),
        ("phantom-0.5b compiled", ["--preset", "phantom-0.5b", *common, "--settings", "1x1024", *compiled]),
        ("phantom-0.5b fused", ["--preset", "phantom-0.5b", *common, "--settings", "1x1024", "--variants", "phantom-compiled,phantom-fused-compiled", "--compile-mode", "reduce-overhead"]),
        ("phantom-1.8b eager", ["--preset", "phantom-1.8b", *common, *eager]),
        ("phantom-0.5b compiled b16", ["--preset", "phantom-0.5b", *common, "--settings", "16x1024", *compiled]),
        ("phantom-1.8b compiled", ["--preset", "phantom-1.8b", *common, "--settings", "1x1024", *compiled]),
    ]


def decode_checks(label: str, payload: dict[str, Any]) -> list[Check]:
    """Phantom's decode tokens/s and its ratios to the plain variants, per setting, from decode.py's JSON."""
    medians: dict[tuple[str, str], float] = {}
    spread: dict[tuple[str, str], tuple[float, float]] = {}
    for row in payload["rows"]:
        if row["metric"] == "decode tokens/s":
            medians[row["setting"], row["variant"]] = row["median"]
            spread[row["setting"], row["variant"]] = (min(row["samples"]), max(row["samples"]))
    checks = []
    for setting in dict.fromkeys(setting for setting, _ in medians):
        for phantom, baselines in (
            ("phantom", ("plain", "plain-matched")),
            ("phantom-compiled", ("plain-compiled",)),
            ("phantom-fused-compiled", ("phantom-compiled",)),
        ):
            if (setting, phantom) not in medians:
                continue
            value = medians[setting, phantom]
            parts = [f"min {spread[setting, phantom][0]:.4g} max {spread[setting, phantom][1]:.4g}"]
            for baseline in baselines:
                if (setting, baseline) in medians:
                    parts.append(f"{baseline} {medians[setting, baseline]:.4g}, ratio {value / medians[setting, baseline]:.3f}")
            checks.append(Check("decode", f"{label} {setting}: {phantom} tokens/s", "measured", value, "; ".join(parts)))
    return checks


def static_cache_crops() -> bool:
    """Whether this transformers release can crop a static cache: decode.py's compiled variants (static caches)
    crop theirs between rounds, which transformers 5.11's `StaticLayer` cannot."""
    from transformers.cache_utils import StaticLayer

    return hasattr(StaticLayer, "crop")


def step_decode(args: argparse.Namespace, device: torch.device, deadline: float) -> list[Check]:
    from decode import is_static

    checks = []
    runs = decode_runs(args, device)
    if getattr(args, "decode", None):
        wanted = [label.strip() for label in args.decode.split(",")]
        runs = [(label, argv) for label, argv in runs if label in wanted]
    for label, argv in runs:
        remaining = deadline - time.monotonic()
        if remaining < 30:
            checks.append(skipped("decode", label, f"time budget spent ({args.budget:.0f} s)"))
            continue
        if any(map(is_static, argv[argv.index("--variants") + 1].split(","))) and not static_cache_crops():
            checks.append(skipped("decode", label, "this transformers release cannot crop a static cache (StaticLayer.crop)"))
            continue
        output = Path(args.scratch) / f"decode-{label.replace(' ', '-')}.json"
        argv = [*argv, "--json", str(output)]
        if not args.isolate:
            import decode

            with contextlib.redirect_stdout(sys.stderr if args.quiet_steps else sys.stdout):
                decode.main(argv)
            checks += decode_checks(label, json.loads(output.read_text()))
            continue
        # decode.py writes its JSON after every setting: a run stopped by the budget keeps the settings it finished
        log = Path(args.scratch) / f"decode-{label.replace(' ', '-')}.log"
        command = [sys.executable, str(Path(__file__).parent / "decode.py"), *argv]
        with log.open("w") as sink:
            try:
                result = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=remaining - 30)
                problem = None if result.returncode == 0 else Check("decode", label, "error", None, last_line(log.read_text()))
            except subprocess.TimeoutExpired:
                problem = skipped("decode", label, f"stopped by the time budget ({args.budget:.0f} s) after the settings above")
        print(log.read_text(), file=sys.stderr, flush=True)
        if output.is_file():
            checks += decode_checks(label, json.loads(output.read_text()))
        if problem:
            checks.append(problem)
    return checks


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "no output"


# ---------------------------------------------------------------------------------------------------------------
# quantization (benchmarks/quantization.py)
# ---------------------------------------------------------------------------------------------------------------


def bitsandbytes_problem(device: torch.device) -> str | None:
    """Why the bitsandbytes cases cannot run here (None: they can)."""
    if device.type != "cuda":
        return "needs CUDA (bitsandbytes' CUDA kernels; the CPU backend: tests/test_quantization.py, benchmarks/quantization.py)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (see the install step)"
    return None


def step_quantization(args: argparse.Namespace, device: torch.device) -> list[Check]:
    import quantization
    from torch import nn

    from phantom_hf.modeling.modeling_phantom import PhantomAttentionMixin

    precisions = ["bfloat16", "bnb-int8", "bnb-nf4"]
    problem = bitsandbytes_problem(device)
    shape = TINY_SHAPE if args.dry_run else ["--preset", "phantom-0.5b"]
    parser = argparse.ArgumentParser()
    quantization.add_model_arguments(parser)
    options = parser.parse_args([*shape, "--device", str(device.type), "--dtype", "bfloat16", "--attn", "sdpa"])
    text_config = quantization.text_config_from_args(options)
    options.folder = str(Path(args.scratch) / "quantization-model")
    options.batch, options.context, options.seed = 1, 16 if args.dry_run else 256, 0
    options.new_tokens, options.repeats, options.warmup = (2, 1, 0) if args.dry_run else (16, 3, 1)
    if not (Path(options.folder) / "config.json").is_file():
        quantization.save_random_model(text_config, Path(options.folder), "sdpa")
    checks: list[Check] = []
    reference: dict[str, torch.Tensor] | None = None
    for precision in precisions:
        if precision.startswith("bnb") and problem:
            checks.append(skipped("quantization", precision, problem))
            continue
        options.precision = precision
        config = quantization.quantization_config(precision, torch.bfloat16, device)
        logits = {}
        for name in ("phantom", "plain"):  # one model at a time
            model = quantization.load(options, name, config)
            if name == "phantom":
                phantom_linears = [
                    module for attention in model.modules() if isinstance(attention, PhantomAttentionMixin)
                    for module_name, module in attention.named_modules() if "phantom" in module_name and isinstance(module, nn.Linear)
                ]
                kept = sum(type(m) is nn.Linear and type(m.weight.data) is torch.Tensor and m.weight.dtype == torch.bfloat16 for m in phantom_linears)
                quantized = sum(1 for p in model.parameters() if type(p.data) is not torch.Tensor or not p.dtype.is_floating_point)
                status = "pass" if kept == len(phantom_linears) and (quantized > 0) == (precision != "bfloat16") else "fail"
                checks.append(Check("quantization", f"{precision}: Phantom modules kept in bf16", status, kept, f"of {len(phantom_linears)}; {quantized} quantized tensors in the backbone"))
            with torch.no_grad():
                logits[name] = model(input_ids=quantization.prompt(options, text_config.vocab_size)).logits.float()
            del model
        if reference is None:
            reference = logits
        else:
            error = {name: float((logits[name] - reference[name]).norm() / reference[name].norm()) for name in logits}
            status = "pass" if error["phantom"] <= QUANTIZATION_MARGIN * error["plain"] + 1e-3 else "fail"
            detail = f"relative error; plain backbone {error['plain']:.4g}; allowed {QUANTIZATION_MARGIN}x the backbone's"
            checks.append(Check("quantization", f"{precision}: logits vs bfloat16", status, error["phantom"], detail))
        speed = quantization.measure_speed(options)
        plain, phantom = (statistics_median(speed[name]["tokens/s"]) for name in ("plain", "phantom"))
        checks.append(Check("quantization", f"{precision}: decode tokens/s phantom", "measured", phantom, f"plain {plain:.4g}, ratio {phantom / plain:.3f}"))
    return checks


def statistics_median(samples: list[float]) -> float:
    import statistics

    return statistics.median(samples)


# ---------------------------------------------------------------------------------------------------------------
# vLLM (tests/vllm/helpers.py)
# ---------------------------------------------------------------------------------------------------------------

VLLM_NEW_TOKENS = 8
VLLM_CASE = "tokens = transformers, CUDA graphs on"


def vllm_problem(args: argparse.Namespace, device: torch.device) -> str | None:
    """Why the vllm step cannot run here (None: it can), in this interpreter or the install step's venv."""
    if device.type != "cuda":
        return "needs CUDA and the vLLM CUDA build (the CPU build: tests/vllm, .ci/vllm-pass.sh)"
    if importlib.util.find_spec("vllm") is None and not vllm_python(args).is_file():
        return "vllm is not installed (see the install step)"
    return None


def step_vllm(args: argparse.Namespace, device: torch.device) -> list[Check]:
    """transformers' greedy tokens (CPU, float32) on a tiny Phantom folder, then (CUDA, vllm importable) vLLM's with
    CUDA graphs on, float32."""
    from tests.vllm import helpers

    model, processor = helpers.make_phantom("qwen2")
    folder = helpers.save(model, processor, Path(args.scratch) / "vllm-model")
    images = [helpers.random_image(56, 28, seed=1)]
    prompts = [(helpers.chat_prompt(processor, "what is in the image ?", images=1), images), (helpers.chat_prompt(processor, "w1 w2 w3"), [])]
    expected = [helpers.hf_greedy(model, processor, text, pictures, VLLM_NEW_TOKENS)[1] for text, pictures in prompts]
    from vllm import SamplingParams

    engine = helpers.vllm_engine(folder, enforce_eager=False, gpu_memory_utilization=0.3, max_num_batched_tokens=2048)
    config = engine.llm_engine.vllm_config
    graphs = str(getattr(config.compilation_config, "cudagraph_mode", "?"))
    eager = config.model_config.enforce_eager
    params = SamplingParams(temperature=0.0, max_tokens=VLLM_NEW_TOKENS, ignore_eos=True)
    outputs = engine.generate([helpers.as_vllm_prompt(text, pictures) for text, pictures in prompts], params)
    got = [list(output.outputs[0].token_ids) for output in outputs]
    helpers.shutdown(engine)
    same = got == expected
    detail = f"2 prompts (one with an image), {VLLM_NEW_TOKENS} greedy tokens, float32; enforce_eager={eager}, cudagraph_mode={graphs}"
    if not same:
        detail += f"; vllm {got} vs transformers {expected}"
    return [Check("vllm", VLLM_CASE, "pass" if same and not eager else "fail", same, detail)]


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------


def run_step(name: str, args: argparse.Namespace, device: torch.device, deadline: float) -> list[Check]:
    """One step: in this process (--dry-run, or --no-isolate), or in a process of its own with the time left."""
    remaining = deadline - time.monotonic()
    if name == "vllm" and (problem := vllm_problem(args, device)):  # said before the budget: it would not run anyway
        return [skipped("vllm", VLLM_CASE, problem)]
    if name != "install" and remaining < 20:
        return [skipped(name, "all", f"time budget spent ({args.budget:.0f} s)")]
    if name == "decode":  # decode.py runs in processes of its own already
        return step_decode(args, device, deadline)
    if args.isolate and name != "install":
        output = Path(args.scratch) / f"step-{name}.json"
        python = str(vllm_python(args)) if name == "vllm" and vllm_python(args).is_file() else sys.executable
        command = [python, __file__, "--step", name, "--json", str(output), "--scratch", args.scratch, "--budget", str(remaining)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=remaining)
        except subprocess.TimeoutExpired:
            return [skipped(name, "all", f"timed out after {remaining:.0f} s (time budget)")]
        if result.returncode != 0:  # what the worker said goes to the log: a failed check or a traceback
            print(result.stderr[-6000:], file=sys.stderr, flush=True)
        if not output.is_file():  # the worker broke before writing its checks (it exits 1 when one fails)
            said = last_line(result.stderr) if result.stderr.strip() else last_line(result.stdout)
            return [Check(name, "all", "error", None, f"exit status {result.returncode}: {said}")]
        return [Check(**check) for check in json.loads(output.read_text())["checks"]]
    steps: dict[str, Callable[[argparse.Namespace, torch.device], list[Check]]] = {
        "install": step_install,
        "attention": step_attention,
        "generate": step_generate,
        "quantization": step_quantization,
        "vllm": step_vllm,
    }
    try:
        return steps[name](args, device)
    except Exception as error:  # a step that breaks is reported and the others still run
        traceback.print_exc()
        return [Check(name, "all", "error", None, f"{type(error).__name__}: {str(error)[:300]}")]


def main(argv: list[str] | None = None) -> list[Check]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step at tiny size on the CPU; CUDA-only parts skipped")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {', '.join(STEPS)}")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 8 minutes)")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="a folder of wheels pip looks in first (flash-attn, bitsandbytes, vllm)")
    parser.add_argument("--json", default=None, metavar="OUT", help="results JSON (default benchmarks/results/gpu-check-<device>.json)")
    parser.add_argument("--scratch", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false", default=None, help="run every step in this process")
    parser.add_argument("--decode", default=None, metavar="LABELS", help="comma-separated decode runs to do (default all: " + "; ".join(label for label, _ in decode_runs(argparse.Namespace(dry_run=False), torch.device("cuda"))) + ")")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.steps.split(",") if name.strip()]
    if unknown := sorted(set(names) - set(STEPS)):
        parser.error(f"--steps: unknown {unknown}; choose from {', '.join(STEPS)}")
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if args.decode and (unknown := sorted(set(args.decode.split(",")) - {label for label, _ in decode_runs(args, device)})):
        parser.error(f"--decode: unknown {unknown}; see --help")
    if args.isolate is None:
        args.isolate = device.type == "cuda"
    args.quiet_steps = True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    started = time.monotonic()
    deadline = started + args.budget

    with contextlib.ExitStack() as stack:
        if args.scratch is None:
            args.scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-"))
        if args.step:  # a worker: one step in this process, its checks to --json
            args.isolate = False
            checks = run_step(args.step, args, device, deadline)
            Path(args.json).write_text(json.dumps({"checks": [asdict(check) for check in checks]}))
            return checks
        print(f"gpu_check: {'dry run, ' if args.dry_run else ''}device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""), flush=True)
        checks: list[Check] = []
        for name in STEPS:
            if name not in names:
                continue
            step_started = time.monotonic()
            new = run_step(name, args, device, deadline)
            checks += new
            print(f"\n## {name} ({time.monotonic() - step_started:.0f} s)\n{table(new)}", flush=True)
    elapsed = time.monotonic() - started
    title = f"gpu_check on {device}" + (" (dry run: tiny models on the CPU)" if args.dry_run else "")
    print(f"\n### {title}, {elapsed:.0f} s\n\n{table(checks)}")
    failed = [check for check in checks if check.status in ("fail", "error")]
    print(f"\n{sum(c.status == 'pass' for c in checks)} passed, {len(failed)} failed or broke, {sum(c.status == 'skipped' for c in checks)} skipped")
    from common import machine_info

    output = Path(args.json or ROOT / "benchmarks" / "results" / f"gpu-check-{'dry-run' if args.dry_run else device.type}.json")
    payload = {"benchmark": "gpu_check", "dry_run": args.dry_run, "seconds": elapsed, "machine": machine_info(device), "checks": [asdict(c) for c in checks]}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {output}")
    return checks


if __name__ == "__main__":
    sys.exit(1 if any(check.status in ("fail", "error") for check in main()) else 0)
