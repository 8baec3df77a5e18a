"""benchmarks/gpu_check.py --dry-run: every step of the GPU check end to end at tiny size on the CPU, so that the
script a GPU machine runs does not rot. The CUDA-only parts must be reported as skipped with a reason and no value;
the parts that run on the CPU must pass (logits against the float64 reference, tokens equal across caches)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


def test_dry_run_runs_every_step_and_skips_only_the_cuda_parts(tmp_path):
    output = tmp_path / "gpu-check.json"
    gpu_check.main(["--dry-run", "--json", str(output), "--scratch", str(tmp_path)])
    checks = json.loads(output.read_text())["checks"]
    by_status: dict[str, list[tuple[str, str]]] = {}
    for check in checks:
        by_status.setdefault(check["status"], []).append((check["step"], check["case"]))
        if check["status"] in ("skipped", "error"):  # never a number that was not measured
            assert check["value"] is None and check["detail"], check
    assert "fail" not in by_status and "error" not in by_status, [c for c in checks if c["status"] in ("fail", "error")]
    assert {check["step"] for check in checks} == set(gpu_check.STEPS)

    passed = set(by_status["pass"])
    for backbone in gpu_check.ATTENTION_BACKBONES:
        for dtype in ("float32", "bfloat16"):
            assert ("attention", f"{backbone} {dtype} eager") in passed
            assert ("attention", f"{backbone} {dtype} sdpa") in passed
            assert ("attention", f"{backbone} {dtype} flash_attention_2") in by_status["skipped"]
    assert ("generate", "greedy: static cache = default cache") in passed
    assert ("generate", "beams 2: static cache = default cache") in passed
    assert any(step == "generate" and case.startswith("greedy: static + torch.compile") for step, case in passed)
    assert ("quantization", "bfloat16: Phantom modules kept in bf16") in passed
    assert {case for step, case in by_status["skipped"] if step == "quantization"} == {"bnb-int8", "bnb-nf4"}
    assert [step for step, _ in by_status["skipped"]].count("vllm") == 1

    decode = {check["case"]: check for check in checks if check["step"] == "decode"}
    for mode, phantom in (("eager", "phantom"), ("compiled", "phantom-compiled")):
        if mode == "compiled" and not gpu_check.static_cache_crops():  # transformers 5.11: skipped, with the reason
            assert ("decode", "tiny compiled") in by_status["skipped"]
            continue
        for setting in ("b1 ctx16", "b2 ctx16"):
            row = decode[f"tiny {mode} sdpa {setting}: {phantom} tokens/s"]
            assert row["status"] == "measured" and row["value"] > 0 and "ratio" in row["detail"]
