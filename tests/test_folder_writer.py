"""The one atomic folder writer (`modeling/folder_phantom.py`) of `save_pretrained` and `phantom-hf convert`: two
processes saving into one folder at once end with one whole model; a writer killed at any point leaves the old
model loadable or the new one whole; what a killed writer left is cleaned by the next write."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from phantom_hf import PhantomForConditionalGeneration
from phantom_hf.modeling import folder_phantom
from phantom_hf.modeling.folder_phantom import clear_leftovers, write_folder

from .conftest import make_model

ROOT = Path(__file__).resolve().parents[1]
# (seed, layers) of the two models the processes save: a config of one with the weights of the other does not load
MODELS = {"A": (1, 3), "B": (2, 2)}


def run_child(script: str, *args: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", textwrap.dedent(script), *args]
    if wait:
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_whole(folder: Path, names: tuple[str, ...]) -> str:
    """`folder` loads as exactly one of the models `names`; returns which."""
    loaded = PhantomForConditionalGeneration.from_pretrained(folder).double().state_dict()
    for name in names:
        seed, layers = MODELS[name]
        expected = make_model(seed=seed, text_config={"num_hidden_layers": layers}).state_dict()
        if loaded.keys() == expected.keys() and all(torch.equal(loaded[key], expected[key]) for key in expected):
            return name
    raise AssertionError(f"{folder} holds none of the models {names} whole")


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.parent.iterdir() if path.name.startswith(f".{folder.name}."))


# A save of model A that pauses right after its first rename (successful or not) until model B's save into the same
# folder has finished: the interleaving that gave A's config with B's weights when files were moved in one by one.
SAVE_PAUSING_AFTER_FIRST_RENAME = """
    import os, sys, time
    from pathlib import Path
    from tests.conftest import make_model
    folder, flags, role = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    model = make_model(seed=int(sys.argv[4]), text_config={"num_hidden_layers": int(sys.argv[5])})
    if role == "A":
        def pausing(function):
            def wrapped(*args, **kwargs):
                try:
                    return function(*args, **kwargs)
                finally:
                    if not (flags / "A_paused").exists():
                        (flags / "A_paused").touch()
                        while not (flags / "B_done").exists():
                            time.sleep(0.05)
            return wrapped
        os.rename, os.replace = pausing(os.rename), pausing(os.replace)
    else:
        while not (flags / "A_paused").exists():
            time.sleep(0.05)
    model.save_pretrained(folder)
    (flags / f"{role}_done").touch()
"""


def test_two_processes_saving_into_one_folder_end_with_one_whole_model(tmp_path: Path) -> None:
    folder, flags = tmp_path / "model", tmp_path / "flags"
    flags.mkdir()
    make_model(seed=0).save_pretrained(folder)  # an earlier model in the folder
    children = [
        run_child(SAVE_PAUSING_AFTER_FIRST_RENAME, str(folder), str(flags), role, *map(str, MODELS[role]), wait=False)
        for role in ("A", "B")
    ]
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    assert assert_whole(folder, ("A", "B")) == "A"  # the save that swapped in last
    assert leftovers(folder) == []


def test_a_save_keeps_the_other_files_of_the_folder_and_replaces_weights_as_a_set(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    make_model(seed=0).save_pretrained(folder, max_shard_size="100KB")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "README.md").write_text("a model card")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "trainer_state.json").write_text("{}")
    seed, layers = MODELS["B"]
    make_model(seed=seed, text_config={"num_hidden_layers": layers}).save_pretrained(folder)
    assert assert_whole(folder, ("B",)) == "B"
    assert sorted(path.name for path in folder.glob("model*.safetensors*")) == ["model.safetensors"]
    assert (folder / "tokenizer.json").read_text() == "{}" and (folder / "checkpoint-2" / "trainer_state.json").is_file()
    assert (folder / "README.md").read_text() == "a model card" and leftovers(folder) == []


# A save of model A into a folder holding model B, killed (os._exit, no cleanup) at one point of the write.
SAVE_KILLED = """
    import os, sys
    from pathlib import Path
    from phantom_hf.modeling import folder_phantom
    from tests.conftest import make_model
    folder, point = Path(sys.argv[1]), sys.argv[2]
    model = make_model(seed=1, text_config={"num_hidden_layers": 3})
    if point == "writing":
        original_write_folder = folder_phantom.write_folder
        def killed_after_writing(folder, write, **kwargs):
            return original_write_folder(folder, lambda staging: (write(staging), os._exit(9)), **kwargs)
        import phantom_hf.modeling.modeling_phantom as modeling
        modeling.write_folder = killed_after_writing
    if point == "set_aside":  # no atomic exchange: the old folder is renamed aside, then the new one in
        folder_phantom._exchange = lambda first, second: False
        rename = os.rename
        def killed_after_setting_aside(source, target):
            rename(source, target)
            if ".old-" in str(target):
                os._exit(9)
        os.rename = killed_after_setting_aside
    if point == "swapped":
        exchange = folder_phantom._exchange
        folder_phantom._exchange = lambda first, second: (exchange(first, second), os._exit(9))
    model.save_pretrained(folder)
"""


@pytest.mark.skipif(os.name != "posix", reason="leftovers of dead processes are only reported where processes cannot be probed")
@pytest.mark.parametrize("point, survivor", [("writing", "B"), ("set_aside", "B"), ("swapped", "A")])
def test_a_save_killed_at_any_point_leaves_the_old_model_or_the_new_one_whole(tmp_path: Path, point: str, survivor: str) -> None:
    folder = tmp_path / "model"
    seed, layers = MODELS["B"]
    make_model(seed=seed, text_config={"num_hidden_layers": layers}).save_pretrained(folder)
    killed = run_child(SAVE_KILLED, str(folder), point)
    assert killed.returncode == 9, killed.stdout + killed.stderr
    if point == "swapped" and not leftovers(folder):
        pytest.skip("no atomic exchange on this system (renameat2): the set_aside case covers the fallback")
    assert leftovers(folder)  # the killed process left its staging (or the old folder set aside)
    clear_leftovers(folder)  # what the next write into the folder does first
    assert leftovers(folder) == []
    assert assert_whole(folder, ("A", "B")) == survivor


def test_leftovers_of_live_processes_other_hosts_and_other_folders_are_kept(tmp_path: Path) -> None:
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    host = folder_phantom._HOST
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    dead_staging = tmp_path / f".model.staging-{host}-{dead}-0a1b2c3d"
    kept = [
        tmp_path / f".model.staging-{host}-{os.getpid()}-0a1b2c3d",  # a write of a live process
        tmp_path / f".model.staging-{other_host}-{dead}-0a1b2c3d",  # another host's, on a shared file system
        tmp_path / f".other.staging-{host}-{dead}-0a1b2c3d",  # another folder's
    ]
    for path in [dead_staging, *kept]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 100)
    write_folder(tmp_path / "model", lambda folder: (folder / "config.json").write_text("{}"), replace=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["model", *(path.name for path in kept)])
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        write_folder(tmp_path / "model", lambda folder: (folder / "config.json").write_text("[]"), replace=False)
    assert (tmp_path / "model" / "config.json").read_text() == "{}"


def test_saving_into_the_working_directory_keeps_it(tmp_path: Path, monkeypatch) -> None:
    """A swap would leave the process in the old, deleted folder: such a save writes in place instead."""
    folder = tmp_path / "model"
    make_model(seed=0).save_pretrained(folder)
    monkeypatch.chdir(folder)
    seed, layers = MODELS["B"]
    make_model(seed=seed, text_config={"num_hidden_layers": layers}).save_pretrained(".")
    assert Path.cwd() == folder.resolve() and Path("config.json").is_file()
    assert assert_whole(folder, ("B",)) == "B" and leftovers(folder) == []
