"""The `phantom-hf` entry (phantom_hf_launch) and the CPU thread policy (phantom_hf.threads): the command, the demo
and the trainer run a small model on one intra-op thread unless the user chose a count, the command sets a passive
OpenMP wait policy before torch loads, `phantom-hf --help` loads neither torch nor transformers, and Ctrl-C stops a
caller of `cli.main` (the command exits with 130).

The policy cases run in a fresh interpreter: the test session itself already runs under the policy (conftest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import phantom_hf_launch
from phantom_hf import cli

REPO = Path(__file__).resolve().parents[1]
OWN_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")

# `phantom-hf demo` through the console script's entry, into a non-empty --out folder: the demo applies the policy,
# then refuses the folder before building anything; the script reports what was in force.
DEMO_ENTRY = """
import os, sys
import phantom_hf_launch
sys.argv = ["phantom-hf", "demo", "--out", sys.argv[1], "--budget", "quick"]
status = phantom_hf_launch.main()
import torch
print(status, torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"))
"""

# A PhantomPOTrainer on a tiny CPU model, after `torch.set_num_threads(n)` when n is given; before it, the policy
# leaves a model of SMALL_MODEL_PARAMETERS (on the CPU) alone.
TRAINER = """
import sys, types
from pathlib import Path
import torch
if len(sys.argv) > 2:
    torch.set_num_threads(int(sys.argv[2]))
default = torch.get_num_threads()
from phantom_hf.threads import SMALL_MODEL_PARAMETERS, use_cpu_thread_policy
large = types.SimpleNamespace(parameters=lambda: [torch.zeros(1).expand(SMALL_MODEL_PARAMETERS)])
assert use_cpu_thread_policy(large) == default
from phantom_hf.trainer import PhantomPOTrainer
from tests.test_trainer import color_triples, make_args, make_model, make_processor
PhantomPOTrainer(make_model(), make_args(Path(sys.argv[1])), train_dataset=color_triples(4), processing_class=make_processor())
print(default, torch.get_num_threads(), torch.get_num_interop_threads())
"""


def run_python(code: str, *args: str, **environment: str) -> list[str]:
    """Run `code` in a new interpreter whose environment lacks the thread variables (plus `environment`); its last
    line of output, split."""
    env = {key: value for key, value in os.environ.items() if key not in OWN_VARIABLES}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **environment)
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1].split()


def test_top_level_help_loads_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, phantom_hf_launch\n"
        "sys.argv = ['phantom-hf', '--help']\n"
        "try:\n    phantom_hf_launch.main()\nexcept SystemExit as stop:\n    assert stop.code == 0\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    assert run_python(code) == ["False", "False"]


@pytest.fixture
def occupied(tmp_path: Path) -> Path:
    (tmp_path / "keep.txt").write_text("not the demo's")
    return tmp_path


def test_the_demo_command_runs_on_one_thread_with_a_passive_wait_policy(occupied: Path) -> None:
    assert run_python(DEMO_ENTRY, str(occupied)) == ["2", "1", "PASSIVE"]


def test_the_demo_command_keeps_the_users_omp_settings(occupied: Path) -> None:
    assert run_python(DEMO_ENTRY, str(occupied), OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE") == ["2", "2", "ACTIVE"]


def test_the_trainer_runs_a_small_cpu_model_on_one_thread(tmp_path: Path) -> None:
    default, in_force, interop = map(int, run_python(TRAINER, str(tmp_path)))
    assert default == interop and in_force == 1


def test_the_trainer_keeps_a_count_set_with_torch(tmp_path: Path) -> None:
    chosen = (os.cpu_count() or 1) + 1  # never torch's default (one thread per physical core)
    default, in_force, _ = map(int, run_python(TRAINER, str(tmp_path), str(chosen)))
    assert default == in_force == chosen



def test_ctrl_c_stops_the_caller_of_main_and_the_command_exits_with_130(capsys, monkeypatch) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["card", "folder"])
    assert capsys.readouterr().err == "phantom-hf card: interrupted\n"
    monkeypatch.setattr(phantom_hf_launch, "running", False)
    monkeypatch.setattr(sys, "argv", ["phantom-hf", "card", "folder"])
    assert phantom_hf_launch.main() == 130
    assert capsys.readouterr().err == "phantom-hf card: interrupted\n"
