"""The scripts in examples/ run offline, as a user would run them, and do what they print.

Each example runs in a fresh process (`sys.executable examples/X.py ...`) with HF_HUB_OFFLINE=1, one thread, an
empty HF_HOME (no token, no cache) and small flags; the checks read its printed lines and its output folders.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], env=env, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        pytest.fail(f"{name} exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def printed(stdout: str, label: str) -> str:
    """The value of the line `label: value` (the last one when printed several times)."""
    values = re.findall(rf"^{re.escape(label)}: (.*)$", stdout, flags=re.MULTILINE)
    assert values, f"no line {label!r} in the output:\n{stdout}"
    return values[-1].strip()


def max_abs_diff(stdout: str, what: str) -> float:
    return float(printed(stdout, f"max-abs-diff {what}"))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory, home) -> tuple[subprocess.CompletedProcess, Path]:
    folder = tmp_path_factory.mktemp("inference") / "model"
    result = run_example("inference_pipeline.py", "--output-dir", str(folder), "--max-new-tokens", "5", home=home)
    return result, folder


def test_inference_pipeline_generate_and_auto_classes_agree(inference_run) -> None:
    result, folder = inference_run
    answers = [printed(result.stdout, f"{way} answer") for way in ("pipeline", "generate", "auto")]
    assert answers[0].strip("'\"") != "", "the tiny model answered nothing: the check below would be vacuous"
    assert answers[0] == answers[1] == answers[2]
    assert printed(result.stdout, "auto classes") == "PhantomForConditionalGeneration + PhantomProcessor"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_phantom.")
    assert (folder / "modeling_phantom.py").is_file() and (folder / "processing_phantom.py").is_file()


def test_lora_adapter_reloads_and_merges_to_the_same_function(tmp_path, home) -> None:
    args = ("--output-dir", str(tmp_path), "--steps", "4", "--num-images", "4")
    result = run_example("lora_finetune.py", *args, home=home)
    assert max_abs_diff(result.stdout, "trained-adapter vs reloaded-adapter") < 1e-5
    assert max_abs_diff(result.stdout, "reloaded-adapter vs merged") < 1e-4
    assert max_abs_diff(result.stdout, "merged vs merged-folder") < 1e-5
    assert max_abs_diff(result.stdout, "base vs merged") > 1e-3  # the adapter learned something
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        adapter_names = list(handle.keys())
    assert any("lora_A" in name for name in adapter_names)
    assert any("multi_modal_projector" in name for name in adapter_names)  # modules_to_save travel with the adapter
    assert not (merged / "adapter_config.json").exists()
    with safe_open(str(merged / "model.safetensors"), framework="pt") as handle:
        merged_names = set(handle.keys())
    with safe_open(str(tmp_path / "base" / "model.safetensors"), framework="pt") as handle:
        assert merged_names == set(handle.keys())  # a plain Phantom checkpoint: no lora_/base_layer names


def test_convert_checkpoint_from_published_layout_is_exact(tmp_path, home) -> None:
    result = run_example("convert_checkpoint.py", "--output-dir", str(tmp_path), home=home)
    with safe_open(str(tmp_path / "published" / "model.safetensors"), framework="pt") as handle:
        published = set(handle.keys())
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in published and "mlp1.1.weight" in published
    assert not any(name.startswith("model.") for name in published)
    loaded = printed(result.stdout, "loaded with the Auto classes")
    assert loaded == "PhantomForConditionalGeneration + PhantomProcessor"
    assert max_abs_diff(result.stdout, "original vs converted") == 0.0
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["model_type"] == "phantom" and "auto_map" in config


def test_push_dry_run_lists_exactly_the_folder(inference_run, home) -> None:
    _, folder = inference_run
    result = run_example("push_to_hub.py", "--folder", str(folder), "--repo-id", "someone/tiny", "--dry-run", home=home)
    listed = re.findall(r"^  upload: (\S+) \(\d+ bytes\)$", result.stdout, flags=re.MULTILINE)
    on_disk = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    assert listed == on_disk and "README.md" in listed and "model.safetensors" in listed


@pytest.mark.parametrize("via", ["push_folder", "push_to_hub"])
def test_push_fails_fast_offline(inference_run, home, via) -> None:
    _, folder = inference_run
    before = sorted(folder.iterdir())
    args = ("--folder", str(folder), "--repo-id", "someone/tiny", "--via", via)
    result = run_example("push_to_hub.py", *args, home=home, check=False)
    assert result.returncode == 1
    assert "push to someone/tiny failed" in result.stderr and "offline mode" in result.stderr
    if via == "push_folder":
        assert "nothing was uploaded" in result.stderr
    assert sorted(folder.iterdir()) == before
