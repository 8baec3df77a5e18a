"""`phantom-hf` faults: one error line and exit status 2 (the traceback with --debug or PHANTOM_HF_DEBUG=1),
sub-command modules imported only when used, the demo's folder and offline mode, resuming an interrupted
`train`, and a bounded wait on a Hub that never answers."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants

from phantom_hf import PhantomForConditionalGeneration, cli
from phantom_hf.answering import answer_question
from phantom_hf.synthetic import generate_examples, to_dataset

from .test_cli import run, tiny_folder  # noqa: F401  (the module-scoped tiny saved model)


def assert_one_error_line(status: int, err: str, command: str, *fragments: str) -> None:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"phantom-hf {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ------------------------------------------------------------------------------------------ error lines


def test_broken_model_folders_images_and_devices_give_one_line(tiny_folder: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    image = tmp_path / "shapes.png"
    generate_examples(1, seed=0, image_size=28)[0].image.save(image)
    truncated = copy_folder(tiny_folder, tmp_path / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    corrupt = copy_folder(tiny_folder, tmp_path / "corrupt")
    (corrupt / "config.json").write_text('{"model_type": "phantom", ')
    pickled = copy_folder(tiny_folder, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save({"weights": [print]}, pickled / "pytorch_model.bin")  # a pickle that weights_only loading refuses
    (tmp_path / "text.png").write_text("not an image")
    question = ["-q", "What colour?"]
    cases = [
        (["chat", str(truncated), *question], [f"weights file {truncated / 'model.safetensors'} is unreadable"]),
        (["chat", str(corrupt), *question], [f"{corrupt / 'config.json'} is not valid JSON"]),
        (["card", str(corrupt)], [f"{corrupt / 'config.json'} is not valid JSON"]),
        (["chat", str(pickled), *question], [f"cannot load the model {str(pickled)!r}"]),
        (["chat", str(tmp_path / "missing-model"), *question], [f"model folder {str(tmp_path / 'missing-model')!r} does not exist"]),
        (["chat", str(tiny_folder), "--image", str(tmp_path / "text.png"), *question], [f"image file {str(tmp_path / 'text.png')!r} cannot be decoded"]),
        (["chat", str(tiny_folder), "--image", str(tmp_path), *question], [f"image file {str(tmp_path)!r} is a directory"]),
        (["chat", str(tiny_folder), "--device", "nonsense", *question], ["--device 'nonsense' cannot be used"]),
        (["chat", str(tiny_folder), "--device", "cuda:7", *question], ["--device 'cuda:7' cannot be used"]),
    ]
    for argv, fragments in cases:
        status, _, err = run(capsys, *argv)
        assert_one_error_line(status, err, argv[0], *fragments)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user that read-only permissions stop")
def test_read_only_destination_gives_one_line(tiny_folder: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    dataset = tmp_path / "triples"
    to_dataset(generate_examples(2, seed=1, image_size=28, kinds=["color"])).save_to_disk(str(dataset))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        status, _, err = run(
            capsys, "train", "--model", str(tiny_folder), "--dataset", str(dataset), "--output-dir", str(locked / "out"),
            "--max-steps", "1", "--batch-size", "2", "--steps", "1",
        )  # fmt: skip
    finally:
        locked.chmod(0o700)
    assert_one_error_line(status, err, "train", f"the output folder {str(locked / 'out')!r} cannot be written", "Permission denied")


def test_impossible_destination_is_refused_before_training(tiny_folder: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    (tmp_path / "a-file").write_text("")
    status, _, err = run(
        capsys, "train", "--model", str(tiny_folder), "--dataset", str(tmp_path / "no-data"),
        "--output-dir", str(tmp_path / "a-file" / "out"), "--max-steps", "1",
    )  # fmt: skip
    assert_one_error_line(status, err, "train", f"the output folder {str(tmp_path / 'a-file' / 'out')!r} cannot be written")


def test_debug_flag_or_environment_shows_the_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "config.json").write_text("{")
    status, _, err = run(capsys, "card", str(tmp_path))
    assert_one_error_line(status, err, "card", "is not valid JSON")
    with pytest.raises(cli.CLIError, match="is not valid JSON"):
        cli.main(["--debug", "card", str(tmp_path)])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(cli.CLIError, match="is not valid JSON"):
        cli.main(["card", str(tmp_path)])


def test_interactive_chat_reports_a_bad_image_and_keeps_the_session(tiny_folder: Path, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: F811
    example = generate_examples(1, seed=3, image_size=28, kinds=["color"])[0]
    example.image.save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines = [f":image {tmp_path / 'bad.png'}", example.question, ":quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    status, out, err = run(capsys, "chat", str(tiny_folder), "--image", str(tmp_path / "good.png"), "--max-new-tokens", "4")
    assert status == 0
    assert f"error: image file {str(tmp_path / 'bad.png')!r} cannot be decoded" in err
    model = PhantomForConditionalGeneration.from_pretrained(tiny_folder).eval()
    from phantom_hf.modeling.processing_phantom import PhantomProcessor

    expected = answer_question(model, PhantomProcessor.from_pretrained(tiny_folder), example.image, example.question, 4)
    assert out.strip() == expected  # answered about the good image, which the bad one did not replace


# --------------------------------------------------------------------------------- lazy sub-commands, demo


def test_parser_imports_no_subcommand_module_and_the_demo_leaves_the_hub_online() -> None:
    code = (
        "import os, sys\n"
        "from phantom_hf import cli\n"
        "cli.build_parser(); cli.build_parser(['train', '--help'])\n"
        "loaded = [name for name in ('phantom_hf.demo', 'phantom_hf.convert') if name in sys.modules]\n"
        "import phantom_hf.demo\n"
        "from huggingface_hub import constants\n"
        "print(loaded, os.environ.get('HF_HUB_OFFLINE'), constants.HF_HUB_OFFLINE)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] None False"


def test_demo_refuses_a_non_empty_out_folder_before_training(tmp_path: Path, capsys, monkeypatch) -> None:
    import phantom_hf.demo as demo

    def no_training(*args, **kwargs):
        raise AssertionError("the demo started although --out is not empty")

    monkeypatch.setattr(demo, "demo_splits", no_training)
    (tmp_path / "config.json").write_text('{"mine": true}')
    (tmp_path / "README.md").write_text("my notes")
    status, _, err = run(capsys, "demo", "--out", str(tmp_path), "--budget", "quick")
    assert_one_error_line(status, err, "demo", f"--out {str(tmp_path)!r} is not empty")
    assert (tmp_path / "config.json").read_text() == '{"mine": true}' and (tmp_path / "README.md").read_text() == "my notes"


def test_the_demo_runs_offline_and_restores_the_setting(monkeypatch) -> None:
    from phantom_hf.demo import offline_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with offline_hub():
        assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ


# ----------------------------------------------------------------------------------------------- resume


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return PhantomForConditionalGeneration.from_pretrained(folder).state_dict()


def test_train_resumes_from_the_last_complete_checkpoint(tiny_folder: Path, tmp_path: Path, capsys, caplog) -> None:  # noqa: F811
    """A run interrupted while writing its last checkpoint (no optimizer, scheduler or trainer state yet), resumed
    with --resume or with the recipe's resume_from_checkpoint, ends with the weights of the uninterrupted run."""
    dataset = tmp_path / "triples"
    to_dataset(generate_examples(8, seed=1, image_size=28, kinds=["color"])).save_to_disk(str(dataset))
    recipe = tmp_path / "recipe.yaml"
    settings = {"common": {"save_steps": 1, "report_to": [], "disable_tqdm": True}}
    recipe.write_text(yaml.safe_dump(settings))
    out = tmp_path / "trained"
    common = [
        "--model", str(tiny_folder), "--dataset", str(dataset), "--output-dir", str(out), "--batch-size", "2",
        "--learning-rate", "1e-3", "--seed", "0", "--steps", "1", "--max-steps", "3",
    ]  # fmt: skip
    last = tmp_path / "trained-checkpoints" / "step1" / "checkpoint-3"

    def train(*flags: str) -> dict[str, torch.Tensor]:
        status, _, err = run(capsys, "train", str(recipe), *common, *flags)
        assert status == 0, err
        return PhantomForConditionalGeneration.from_pretrained(out).state_dict()

    def interrupt() -> None:
        shutil.rmtree(out)
        for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (last / name).unlink(missing_ok=True)

    straight = train()
    assert any(not torch.equal(tensor, final_weights(tiny_folder)[name]) for name, tensor in straight.items())
    interrupt()
    with caplog.at_level(logging.WARNING, logger="phantom_hf.trainer"):
        resumed = train("--resume")
    assert f"skipping the incomplete checkpoint {last}: {last} has no trainer_state.json" in caplog.text
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 3
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7, msg=name)

    interrupt()
    recipe.write_text(yaml.safe_dump({**settings, "resume_from_checkpoint": True}))
    resumed = train()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7, msg=name)

    interrupt()
    capsys.readouterr()
    status, _, err = run(capsys, "train", str(recipe), *common, "--resume", str(last))
    assert_one_error_line(status, err, "train", f"cannot resume from {last}: {last} has no trainer_state.json")


# ------------------------------------------------------------------------------------------------- push


def test_push_gives_up_on_a_hub_that_never_answers(tiny_folder: Path, capsys, monkeypatch) -> None:  # noqa: F811
    """A loopback server accepts the connection and never answers: the push fails after --timeout, uploading
    nothing, instead of waiting forever (the server hangs up after 30 s, so the test itself is bounded)."""
    server = socket.create_server(("127.0.0.1", 0))
    connections: list[socket.socket] = []

    def accept_and_stay_silent() -> None:
        server.settimeout(30)
        try:
            connections.append(server.accept()[0])
            time.sleep(30)
        except OSError:
            pass
        finally:
            for connection in connections:
                connection.close()

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    before = sorted(path.name for path in tiny_folder.iterdir())
    start = time.monotonic()
    try:
        status, _, err = run(capsys, "push", str(tiny_folder), "me/tiny", "--token", "hf_x", "--timeout", "1")
    finally:
        server.close()
    elapsed = time.monotonic() - start
    assert connections, "the push never reached the silent server"
    assert_one_error_line(status, err, "push", "did not answer within 1 s", "nothing was uploaded")
    assert elapsed < 15
    assert sorted(path.name for path in tiny_folder.iterdir()) == before
