"""PhantomPOTrainer under FSDP2 on two CPU processes (gloo) against one process on the same global batch.

Both sides run tests/distributed_worker.py in a subprocess: the two-process side is launched by `accelerate launch`
with examples/accelerate/fsdp2.yaml, switched to the CPU (`use_cpu: true`, 2 processes, no mixed precision). Each
run is 3 optimizer steps on a global batch of 4 triples (2 per process). Tolerances: the losses agree to 1e-6 (they
are the same sums, reduced in another order), the weights after 3 AdamW steps at lr 1e-2 to 1e-4 (a hundredth of
one step: Adam divides each gradient by its running RMS, which magnifies the reduction-order differences of
gradients near zero; measured 2e-5 at most).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phantom_hf import PhantomForConditionalGeneration
from phantom_hf.modeling.processing_phantom import PhantomProcessor
from phantom_hf.trainer import consolidate_fsdp_checkpoint

from .distributed_worker import build, triples

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
STEPS, PER_PROCESS = 3, 2


def cpu_config(tmp: Path, source: Path, processes: int = 2) -> Path:
    """The shipped accelerate config with the CPU switch: what a GPU machine runs, on gloo."""
    text = source.read_text(encoding="utf-8")
    replaced = {"num_processes: 8": f"num_processes: {processes}", "use_cpu: false": "use_cpu: true",
                "mixed_precision: bf16": "mixed_precision: 'no'"}
    for old, new in replaced.items():
        assert old in text, (source, old)
        text = text.replace(old, new)
    path = tmp / source.name
    path.write_text(text, encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One single-process and one two-process FSDP2 launch, side by side; each runs every case in turn."""
    root = tmp_path_factory.mktemp("fsdp2")
    cases = {"po": {"save_steps": 2}, "sft": {"stage": 2}, "lora": {"stage": 2, "lora": True}}
    fsdp_cases = {
        **cases,
        "po_resumed": {"resume_from_checkpoint": str(root / "fsdp" / "po" / "checkpoint-2")},
        "po_no_checkpointing": {"gradient_checkpointing": False},
    }
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(cpu_config(root, REPO / "examples" / "accelerate" / "fsdp2.yaml")), "--main_process_port", "0",
    ]
    processes = [
        subprocess.Popen(
            [*prefix, str(WORKER), "--output-dir", str(root / name), "--runs", json.dumps(todo)],
            env=_env(), cwd=root, stdout=log, stderr=subprocess.STDOUT,
        )
        for name, prefix, todo, log in (
            ("single", [sys.executable], cases, open(root / "single.log", "w")),
            ("fsdp", launch, fsdp_cases, open(root / "fsdp.log", "w")),
        )
    ]
    _wait_for(root, zip(("single", "fsdp"), processes))
    return root


def _wait_for(root: Path, processes) -> None:
    """Wait for each launch (name, process) of a fixture (10 minutes at most) and fail with the tail of its log."""
    for name, process in processes:
        try:
            process.wait(timeout=600)
        finally:
            process.kill()
        assert process.returncode == 0, (root / f"{name}.log").read_text()[-4000:]


def _report(runs: Path, side: str, case: str, rank: int = 0) -> dict:
    return json.loads((runs / side / case / f"rank{rank}.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(folder / name)


def _assert_same_weights(actual: dict, expected: dict, atol: float) -> None:
    assert actual.keys() == expected.keys() and len(actual) > 10
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("case", ["po", "sft", "lora"])
def test_fsdp2_two_processes_equal_one_process(runs, case):
    """Step 1 (PO, LLM frozen), step 2 (SFT, all trainable) and step 2 with LoRA: losses, the set of parameters
    with a gradient, and the saved weights (full model, or adapter) after 3 steps."""
    single, sharded = _report(runs, "single", case), _report(runs, "fsdp", case)
    assert sharded["distributed_type"] == "DistributedType.FSDP" and sharded["fsdp_version"] == 2
    assert sorted(single["losses"]) == sorted(sharded["losses"]) == ["1", "2", "3"]
    for step, loss in single["losses"].items():
        assert abs(sharded["losses"][step] - loss) < 1e-6, (case, single["losses"], sharded["losses"])
    assert sharded["losses"] == _report(runs, "fsdp", case, rank=1)["losses"]
    assert sharded["gradients"] == single["gradients"] and sharded["gradients"]
    _assert_same_weights(_weights(runs / "fsdp" / case / "final"), _weights(runs / "single" / case / "final"), 1e-4)


@pytest.mark.parametrize("case", ["po", "sft", "lora"])
def test_save_trained_model_gathers_what_save_model_gathers(runs, case):
    """The recipe's final save (`save_trained_model`, on the model) equals `trainer.save_model`'s."""
    _assert_same_weights(_weights(runs / "fsdp" / case / "saved"), _weights(runs / "fsdp" / case / "final"), 0.0)


def test_a_sharded_model_is_refused_for_the_next_step(runs):
    assert "already sharded by FSDP" in _report(runs, "fsdp", "sft")["refused"]
    assert _report(runs, "single", "sft")["refused"] is None


def test_fsdp2_wrap_units_are_the_layers_and_the_projector(runs):
    units = _report(runs, "fsdp", "po")["units"]
    assert units.count("Qwen2DecoderLayer") == 2 and units.count("InternVLVisionLayer") == 1
    assert units.count("PhantomProjector") == 1 and units.count("PhantomForConditionalGeneration") == 1


def test_fsdp2_step_one_frozen_weights_get_no_gradient_and_stay_bit_identical(runs):
    """A decoder layer is one FSDP2 unit holding the frozen LLM weights and the trainable Phantom modules: FSDP2
    shards each parameter on its own and reduces only the gradients that exist."""
    initial = {name: tensor for name, tensor in build()[0].state_dict().items()}
    trained = _weights(runs / "fsdp" / "po" / "final")
    trainable = {name for name in initial if "multi_modal_projector" in name or "phantom" in name}
    assert set(_report(runs, "fsdp", "po")["gradients"]) == trainable
    assert any(name.startswith("model.language_model.layers.0.") and "phantom" in name for name in trainable)
    for name, tensor in initial.items():
        assert torch.equal(trained[name], tensor) is (name not in trainable), name


def test_fsdp2_vision_tower_runs_once_per_image(runs):
    """Each process encodes its own 2 triples' images once per step, shared by the chosen and rejected rows."""
    for rank in (0, 1):
        assert _report(runs, "fsdp", "po", rank)["tiles"] == [PER_PROCESS] * STEPS


def test_fsdp2_gradient_checkpointing_changes_nothing(runs):
    """The Phantom attention keeps its anchor operands for the backward; recomputing them under FSDP2 gives the same
    losses and updates as keeping the activations."""
    assert _report(runs, "fsdp", "po")["losses"] == _report(runs, "fsdp", "po_no_checkpointing")["losses"]
    _assert_same_weights(
        _weights(runs / "fsdp" / "po_no_checkpointing" / "final"), _weights(runs / "fsdp" / "po" / "final"), 1e-6
    )


def test_fsdp2_sharded_checkpoint_resumes_and_consolidates(runs, tmp_path):
    checkpoint = runs / "fsdp" / "po" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and not (checkpoint / "model.safetensors").exists()
    resumed, uninterrupted = _report(runs, "fsdp", "po_resumed"), _report(runs, "fsdp", "po")
    assert resumed["tiles"] == [PER_PROCESS]  # only step 3 ran; steps 1-2 come from the checkpoint's state
    assert abs(resumed["losses"]["3"] - uninterrupted["losses"]["3"]) < 1e-6

    folder = Path(consolidate_fsdp_checkpoint(runs / "fsdp" / "po" / "checkpoint-3", tmp_path / "hub"))
    _assert_same_weights(_weights(folder), _weights(runs / "fsdp" / "po" / "final"), 0.0)
    model = PhantomForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(model.state_dict()["lm_head.weight"], _weights(folder)["lm_head.weight"])
    assert PhantomProcessor.from_pretrained(folder).tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == model.config.image_token_id


def test_consolidate_refuses_a_folder_without_shards(tmp_path):
    with pytest.raises(ValueError, match="pytorch_model_fsdp_0"):
        consolidate_fsdp_checkpoint(tmp_path, tmp_path / "out")


def test_cli_train_relaunches_under_the_accelerate_config_and_saves_a_full_folder(tmp_path):
    """`phantom-hf train --accelerate-config` runs the recipe on 2 FSDP2 processes; the final folder holds the
    gathered weights, the same as its last sharded checkpoint consolidated."""
    model, processor = build()
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    triples_folder = tmp_path / "triples"
    triples(4).save_to_disk(str(triples_folder))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("common:\n  use_cpu: true\n  save_steps: 2\n", encoding="utf-8")
    config = cpu_config(tmp_path, REPO / "examples" / "accelerate" / "fsdp2.yaml")
    output = tmp_path / "trained"
    command = [
        sys.executable, "-m", "phantom_hf.cli", "train", str(recipe), "--model", str(tmp_path / "base"),
        "--dataset", str(triples_folder), "--output-dir", str(output), "--steps", "1", "--max-steps", "2",
        "--batch-size", "1", "--learning-rate", "1e-2", "--accelerate-config", str(config),
    ]
    result = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    checkpoint = tmp_path / "trained-checkpoints" / "step1" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()
    consolidated = Path(consolidate_fsdp_checkpoint(checkpoint, tmp_path / "consolidated"))
    _assert_same_weights(_weights(output), _weights(consolidated), 0.0)
    assert not torch.equal(_weights(output)["model.multi_modal_projector.linear_1.weight"],
                           model.state_dict()["model.multi_modal_projector.linear_1.weight"])
    assert (output / "README.md").is_file() and (output / "processor_config.json").is_file()


DEEPSPEED_CASES = {"zero3-po": (3, "po", {}), "zero3-lora": (3, "lora", {"stage": 2, "lora": True}),
                   "zero2-sft": (2, "sft", {"stage": 2})}


@pytest.fixture(scope="module")
def deepspeed_runs(runs) -> Path:
    """examples/accelerate/zero3.yaml (and its ZeRO-2 variant) on 2 CPU processes: DeepSpeed's CPU accelerator
    talks gloo. accelerate allows one DeepSpeed trainer per process, so each case is its own launch."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed: README, More than one device)")
    root = runs / "deepspeed"
    root.mkdir()
    processes = []
    for name, (stage, case, options) in DEEPSPEED_CASES.items():
        config = cpu_config(root, REPO / "examples" / "accelerate" / "zero3.yaml")
        text = config.read_text(encoding="utf-8").replace("use_cpu: true", "use_cpu: false")
        config = root / f"{name}.yaml"
        config.write_text(text.replace("zero_stage: 3", f"zero_stage: {stage}"), encoding="utf-8")
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
            "0", str(WORKER), "--output-dir", str(root / name), "--runs", json.dumps({case: options}),
        ]
        log = open(root / f"{name}.log", "w")
        processes.append((name, subprocess.Popen(command, env=_env(), cwd=root, stdout=log, stderr=subprocess.STDOUT)))
    _wait_for(root, processes)
    return root


@pytest.mark.parametrize("name", list(DEEPSPEED_CASES))
def test_deepspeed_two_processes_equal_one_process(deepspeed_runs, runs, name):
    _, case, _ = DEEPSPEED_CASES[name]
    single = _report(runs, "single", case)
    sharded = json.loads((deepspeed_runs / name / case / "rank0.json").read_text())
    assert sharded["distributed_type"] == "DistributedType.DEEPSPEED"
    for step, loss in single["losses"].items():
        assert abs(sharded["losses"][step] - loss) < 1e-6, (name, single["losses"], sharded["losses"])
    assert sharded["tiles"] == [PER_PROCESS] * STEPS
    final = _weights(deepspeed_runs / name / case / "final")
    _assert_same_weights(final, _weights(runs / "single" / case / "final"), 1e-4)
    _assert_same_weights(_weights(deepspeed_runs / name / case / "saved"), final, 0.0)
    if case == "po":  # step 1 under ZeRO-3: the frozen weights are partitioned too, and come back untouched
        initial = build()[0].state_dict()
        for key, tensor in initial.items():
            assert torch.equal(final[key], tensor) is not ("multi_modal_projector" in key or "phantom" in key), key
