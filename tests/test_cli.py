"""`phantom-hf` command line: every sub-command's --help, clear one-line errors, and the commands that work
offline (card, chat, train, push refusing to run offline) on a tiny model."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants

from phantom_hf import PhantomForConditionalGeneration, cli
from phantom_hf.answering import answer_question
from phantom_hf.hub import folder_files
from phantom_hf.modeling.processing_phantom import PhantomProcessor
from phantom_hf.synthetic import generate_examples, to_dataset, vocabulary
from phantom_hf.tiny import tiny_phantom_config
from phantom_hf.tokenization import build_tokenizer

SUBCOMMAND_OPTIONS = {
    "demo": ["--out"],
    "convert": [],
    "train": ["--model", "--dataset", "--steps", "--lora", "--learning-rate", "recipe"],
    "chat": ["--image", "--question", "--max-new-tokens"],
    "card": ["--base-model", "--dataset", "--info", "--write"],
    "push": ["--private", "--commit-message", "--revision", "--token", "--space", "repo_id"],
    "app": ["--host", "--port", "model"],
}


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("command", sorted(SUBCOMMAND_OPTIONS))
def test_every_subcommand_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: phantom-hf {command}")
    for option in SUBCOMMAND_OPTIONS[command]:
        assert option in out


def test_top_level_help_lists_the_subcommands_and_the_script_is_installed(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in SUBCOMMAND_OPTIONS:
        assert f"    {command} " in out
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["phantom-hf"] == "phantom_hf_launch:main"


def test_missing_subcommand_or_unknown_flag_is_a_usage_error(capsys) -> None:
    for argv in ([], ["push", "folder"], ["chat", "model", "--no-such-flag"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert "usage: phantom-hf" in capsys.readouterr().err


def test_errors_are_one_line_unless_traceback_is_asked(capsys, tmp_path) -> None:
    status, out, err = run(capsys, "card", str(tmp_path))
    assert status == 2 and out == ""
    assert err.strip() == f"phantom-hf card: error: {str(tmp_path)!r} is not a saved model folder (no config.json)"
    with pytest.raises(cli.CLIError, match="no config.json"):
        cli.main(["--traceback", "card", str(tmp_path)])


# ----------------------------------------------------------------------------------------------- train


def train_args(*argv: str):
    return cli.build_parser().parse_args(["train", *argv])


def test_recipe_file_and_flags_combine(tmp_path: Path) -> None:
    recipe = {
        "model": "org/phantom",
        "dataset": "data.jsonl",
        "steps": [1, 2],
        "common": {"per_device_train_batch_size": 8},
        "step1": {"learning_rate": 1e-4},
        "step2": {"learning_rate": 1e-5, "num_train_epochs": 2},
        "card": {"license": "mit"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    resolved = cli.resolve_recipe(train_args(str(path), "--steps", "2", "--batch-size", "4", "--seed", "3"))
    assert resolved["steps"] == [2]
    assert resolved["common"] == {"per_device_train_batch_size": 4, "seed": 3}
    assert resolved["step2"] == {"learning_rate": 1e-5, "num_train_epochs": 2}
    # --learning-rate applies to both steps and beats the per-step values of the recipe.
    resolved = cli.resolve_recipe(train_args(str(path), "--learning-rate", "5e-5"))
    assert resolved["common"]["learning_rate"] == 5e-5 and "learning_rate" not in resolved["step1"]
    json_path = tmp_path / "recipe.json"
    json_path.write_text(json.dumps({"model": "m", "dataset": "d"}))
    assert cli.resolve_recipe(train_args(str(json_path)))["steps"] == [1, 2]


@pytest.mark.parametrize(
    "recipe, flags, message",
    [
        ({"model": "m", "dataset": "d", "stepz": 1}, [], "unknown recipe keys \\['stepz'\\]"),
        ({"dataset": "d"}, [], "no model"),
        ({"model": "m"}, [], "no dataset"),
        ({"model": "m", "dataset": "d"}, ["--steps", "2,1"], "steps must be 1, 2 or both"),
        ({"model": "m", "dataset": "d"}, ["--steps", "3"], "steps must be 1, 2 or both"),
    ],
)
def test_bad_recipes_are_refused(tmp_path: Path, capsys, recipe, flags, message) -> None:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(cli.CLIError, match=message):
        cli.resolve_recipe(train_args(str(path), *flags))
    status, _, err = run(capsys, "train", str(path), *flags)
    assert status == 2 and "phantom-hf train: error:" in err


def test_unparsable_recipe_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("model: [unclosed")
    with pytest.raises(cli.CLIError, match="cannot parse recipe file"):
        cli.resolve_recipe(train_args(str(path)))
    with pytest.raises(cli.CLIError, match="does not exist"):
        cli.resolve_recipe(train_args(str(tmp_path / "missing.yaml")))


# ------------------------------------------------------------------------------------- a tiny saved model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny Phantom model for the synthetic task (28 px tiles, one tile per image) and its processor."""
    tokenizer = build_tokenizer(vocabulary())
    config = tiny_phantom_config(
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        text_config={"vocab_size": len(tokenizer)},
    )
    torch.manual_seed(0)
    model = PhantomForConditionalGeneration(config).eval()
    with torch.no_grad():  # large random weights, so that answers depend on the image
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.3)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = PhantomProcessor.from_config(config, tokenizer, max_patches=1)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_card_renders_writes_and_keeps_metadata(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    info = tmp_path / "info.yaml"
    info.write_text(yaml.safe_dump({"eval_results": {"accuracy": 0.75}, "training": {"step 1": {"beta": 2.0}}}))
    status, out, _ = run(
        capsys, "card", str(tiny_folder), "--base-model", "org/base", "--dataset", "org/shapes",
        "--tag", "demo", "--info", str(info), "--write",
    )  # fmt: skip
    assert status == 0 and "wrote" in out
    text = (tiny_folder / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "org/base" and meta["datasets"] == ["org/shapes"] and "demo" in meta["tags"]
    assert "| accuracy | 0.75 |" in text and "| beta | 2.0 |" in text
    # Re-rendering to stdout keeps the metadata of the existing card; flags still override it.
    status, out, _ = run(capsys, "card", str(tiny_folder), "--license", "mit")
    meta = yaml.safe_load(out.split("---\n")[1])
    assert meta["base_model"] == "org/base" and meta["license"] == "mit" and meta["tags"].count("demo") == 1
    (tiny_folder / "README.md").unlink()


def test_chat_answers_like_generate_on_the_chat_template(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    example = generate_examples(1, seed=0, image_size=28)[0]
    image_path = tmp_path / "shapes.png"
    example.image.save(image_path)
    status, out, _ = run(
        capsys, "chat", str(tiny_folder), "--image", str(image_path), "-q", example.question, "--max-new-tokens", "5"
    )
    assert status == 0
    # Reference: the processor's multimodal chat template and generate, without the CLI.
    model = PhantomForConditionalGeneration.from_pretrained(tiny_folder).eval()
    processor = PhantomProcessor.from_pretrained(tiny_folder)
    content = [{"type": "image", "image": example.image}, {"type": "text", "text": example.question}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    inputs.pop("num_patches", None)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert out.strip() == expected and expected != ""


def test_chat_refuses_a_missing_image_or_empty_question(tiny_folder: Path, capsys) -> None:
    status, _, err = run(capsys, "chat", str(tiny_folder), "--image", "/no/such.png", "-q", "What?")
    assert status == 2 and "image file '/no/such.png' does not exist" in err
    status, _, err = run(capsys, "chat", str(tiny_folder), "-q", "  ")
    assert status == 2 and "--question is empty" in err


def test_push_offline_fails_fast_without_touching_the_folder(tiny_folder: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = sorted(path.name for path in tiny_folder.iterdir())
    status, _, err = run(capsys, "push", str(tiny_folder), "me/tiny", "--token", "hf_x")
    assert status == 2 and "offline mode" in err and "nothing was uploaded" in err
    assert sorted(path.name for path in tiny_folder.iterdir()) == before


def test_app_without_gradio_or_with_a_bad_port_is_one_line(tiny_folder: Path, capsys, monkeypatch) -> None:
    status, _, err = run(capsys, "app", str(tiny_folder), "--port", "70000")
    assert status == 2 and "--port must be between 1 and 65535" in err
    find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "gradio" else find_spec(name))
    status, _, err = run(capsys, "app", str(tiny_folder))
    assert status == 2 and 'Gradio is not installed: pip install "phantom-hf[app]"' in err


def test_train_runs_both_steps_and_saves_a_carded_folder(tiny_folder: Path, tmp_path: Path, capsys) -> None:
    dataset_dir = tmp_path / "triples"
    to_dataset(generate_examples(4, seed=1, image_size=28, kinds=["color"])).save_to_disk(str(dataset_dir))
    out_dir = tmp_path / "trained"
    status, out, err = run(
        capsys, "train", "--model", str(tiny_folder), "--dataset", str(dataset_dir), "--output-dir", str(out_dir),
        "--max-steps", "1", "--batch-size", "2", "--learning-rate", "1e-3", "--seed", "0",
    )  # fmt: skip
    assert status == 0, err
    trained = PhantomForConditionalGeneration.from_pretrained(out_dir)
    original = PhantomForConditionalGeneration.from_pretrained(tiny_folder)
    changed = {
        name
        for name, tensor in trained.state_dict().items()
        if not torch.equal(tensor, original.state_dict()[name])
    }
    # Step 1 moved the projector / Phantom modules, step 2 the language model too.
    assert any("multi_modal_projector" in name for name in changed)
    assert any("phantom" in name for name in changed)
    assert any("mlp" in name and "language_model" in name for name in changed)
    text = (out_dir / "README.md").read_text()
    assert "step 1: projector + Phantom Dimension, PO" in text and "step 2: everything, SFT" in text
    assert "| learning_rate | 0.001 |" in text and "| max_steps | 1 |" in text
    assert "Data: 4 Phantom triples" in text and "num_train_epochs" not in text  # max_steps was what counted
    # Step checkpoints live next to the folder, not in it: the folder is exactly what `push` would upload.
    assert not any("/" in name for name in folder_files(out_dir))
    assert (tmp_path / "trained-checkpoints" / "step1").is_dir()


def test_interactive_chat_reads_questions_and_switches_images(
    tiny_folder: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    examples = generate_examples(2, seed=3, image_size=28, kinds=["color"])
    paths = []
    for index, example in enumerate(examples):
        paths.append(tmp_path / f"image{index}.png")
        example.image.save(paths[-1])
    question = examples[0].question
    lines = [question, f":image {paths[1]}", ":image /missing.png", "", question, ":quit", "never asked"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    status, out, err = run(capsys, "chat", str(tiny_folder), "--image", str(paths[0]), "--max-new-tokens", "4")
    assert status == 0 and "'/missing.png' does not exist" in err
    answers = out.strip().split("\n")
    assert len(answers) == 2  # two questions before :quit; the empty line and the bad image path ask nothing
    assert answers[0] != answers[1]  # the second question saw the second image
    model = PhantomForConditionalGeneration.from_pretrained(tiny_folder).eval()
    processor = PhantomProcessor.from_pretrained(tiny_folder)
    expected = [answer_question(model, processor, example.image, question, 4) for example in examples]
    assert answers == expected
