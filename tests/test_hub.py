"""Model cards (YAML front matter + body), `push_folder` (one commit of exactly the folder's files, no network) and
`push_space` / `phantom-hf push --space` (one commit of a ready Gradio Space, no network)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import CommitOperationAdd, constants
from safetensors.torch import save_file

from packaging.requirements import Requirement

import phantom_hf
from phantom_hf import PhantomForConditionalGeneration, cli, hub
from phantom_hf.hub import (
    HubUploadError,
    describe_training_args,
    folder_files,
    push_folder,
    push_space,
    render_model_card,
    write_model_card,
)
from phantom_hf.tiny import tiny_phantom_config


def front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(YAML metadata, body) of a README, parsed with PyYAML independently of huggingface_hub."""
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_card_front_matter_has_the_hub_fields_and_the_body_the_facts() -> None:
    config = tiny_phantom_config(phantom_mixing="sum")
    text = render_model_card(
        config,
        repo_id="someone/phantom-shapes",
        base_model="someone/phantom-base",
        datasets=["someone/shapes"],
        tags=["demo"],
        training={"step 1 (PO)": {"learning_rate": 3e-4, "beta": 2.0, "max_steps": 40}},
        eval_results={"held-out accuracy": 0.9375},
        num_parameters=123_456,
    )
    meta, body = front_matter(text)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == "someone/phantom-base"
    assert meta["datasets"] == ["someone/shapes"]
    assert {"phantom", "image-text-to-text", "custom_code", "demo"} <= set(meta["tags"])
    assert 'from_pretrained("someone/phantom-shapes", trust_remote_code=True)' in body
    assert 'pipeline("image-text-to-text", model="someone/phantom-shapes", trust_remote_code=True)' in body
    assert "| learning_rate | 0.0003 |" in body and "| beta | 2.0 |" in body and "| max_steps | 40 |" in body
    assert "| held-out accuracy | 0.9375 |" in body
    assert "123,456" in body
    assert 'mixing "sum"' in body and "2 layers, hidden size 64, 4 query / 2 key-value heads of size 16" in body
    assert "Phantom of Latent for Large Language and Vision Models" in body and "2409.14713" in body
    assert "Fine-tuned from [someone/phantom-base]" in body


def test_base_model_is_recorded_from_the_hub_id_the_weights_came_from(tmp_path: Path) -> None:
    config = tiny_phantom_config()
    meta, body = front_matter(render_model_card(config))
    assert "base_model" not in meta and "Fine-tuned from" not in body  # built from scratch
    assert "No training run is recorded" in body and "No evaluation results" in body

    config._name_or_path = "org/phantom-0.5b"
    meta, _ = front_matter(render_model_card(config))
    assert meta["base_model"] == "org/phantom-0.5b"

    local = tmp_path / "org"
    (local / "phantom").mkdir(parents=True)
    config._name_or_path = str(local / "phantom")  # a local folder is not a Hub id
    meta, _ = front_matter(render_model_card(config))
    assert "base_model" not in meta


def test_write_model_card_counts_the_saved_parameters(tmp_path: Path) -> None:
    model = PhantomForConditionalGeneration(tiny_phantom_config())
    model.save_pretrained(tmp_path)
    path = write_model_card(tmp_path, repo_id="me/tiny")
    meta, body = front_matter(path.read_text())
    expected = sum(parameter.numel() for parameter in model.parameters())
    assert f"| Parameters | {expected:,} " in body
    assert meta["model_name"] == "tiny"
    # From the model object, the count is the same.
    assert f"{expected:,}" in render_model_card(model)


def test_card_inputs_are_checked() -> None:
    config = tiny_phantom_config()
    with pytest.raises(TypeError, match="unknown fields.*'trainig'"):
        render_model_card(config, trainig={})
    with pytest.raises(TypeError, match="training must be a mapping"):
        render_model_card(config, training=[("lr", 1e-5)])
    with pytest.raises(TypeError, match=r"training\['step 1'\] must map"):
        render_model_card(config, training={"step 1": 1e-5})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        render_model_card("/nonexistent/folder")


def test_describe_training_args_keeps_what_was_used() -> None:
    args = SimpleNamespace(
        learning_rate=1e-5, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        max_steps=-1, num_train_epochs=1.0, warmup_ratio=0.0, warmup_steps=0, gradient_accumulation_steps=4,
        per_device_train_batch_size=32, loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0, bf16=False,
        gradient_checkpointing=True,
    )  # fmt: skip
    values = describe_training_args(args, po_weight=1.0)
    assert values["learning_rate"] == 1e-5 and values["beta"] == 2.0 and values["simpo_gamma"] == 0.5
    assert values["gradient_accumulation_steps"] == 4 and values["po_weight"] == 1.0
    assert values["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    assert values["num_train_epochs"] == 1.0
    assert "max_steps" not in values and "warmup_ratio" not in values and "bf16" not in values
    args.max_steps = 40
    assert describe_training_args(args)["max_steps"] == 40 and "num_train_epochs" not in describe_training_args(args)


# ------------------------------------------------------------------------------------------------ push


class FakeApi:
    """Records the HfApi calls `push_folder` makes; can fail `whoami` or `create_commit`."""

    instances: list["FakeApi"] = []

    def __init__(self, whoami_error: Exception | None = None, commit_error: Exception | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.whoami_error = whoami_error
        self.commit_error = commit_error
        FakeApi.instances.append(self)

    def whoami(self, **kwargs: Any) -> dict:
        self.calls.append(("whoami", kwargs))
        if self.whoami_error:
            raise self.whoami_error
        return {"name": "me"}

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def create_commit(self, repo_id: str, **kwargs: Any) -> Any:
        self.calls.append(("create_commit", {"repo_id": repo_id, **kwargs}))
        if self.commit_error:
            raise self.commit_error
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def saved_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    tiny_phantom_config().save_pretrained(folder)
    save_file({"weight": torch.zeros(3, 4)}, str(folder / "model.safetensors"))
    (folder / "nested").mkdir()
    (folder / "nested" / "extra.txt").write_text("x")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")  # a local clone's metadata is not part of the model
    return folder


def use_fake_api(monkeypatch: pytest.MonkeyPatch, **options: Any) -> None:
    FakeApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", lambda: FakeApi(**options))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_push_commits_exactly_the_folder_files_in_one_commit(saved_folder: Path, monkeypatch) -> None:
    use_fake_api(monkeypatch)
    commit = push_folder(saved_folder, "me/tiny", private=True, commit_message="first", revision="dev", token="hf_x")
    (api,) = FakeApi.instances
    assert api.names() == ["whoami", "create_repo", "create_branch", "create_commit"]
    create_repo = api.calls[1][1]
    assert create_repo["private"] is True and create_repo["exist_ok"] is True and create_repo["token"] == "hf_x"
    assert api.calls[2][1]["branch"] == "dev"
    commit_call = api.calls[3][1]
    assert commit_call["commit_message"] == "first" and commit_call["revision"] == "dev"
    operations = commit_call["operations"]
    assert all(isinstance(operation, CommitOperationAdd) for operation in operations)
    uploaded = sorted(operation.path_in_repo for operation in operations)
    # The card was written into the folder first, so folder and upload agree file for file.
    assert uploaded == ["README.md", "config.json", "model.safetensors", "nested/extra.txt"]
    assert uploaded == folder_files(saved_folder)
    for operation in operations:
        assert Path(operation.path_or_fileobj).read_bytes() == (saved_folder / operation.path_in_repo).read_bytes()
    meta, body = front_matter((saved_folder / "README.md").read_text())
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert '"me/tiny"' in body and "| Parameters | 12 |" in body
    assert commit.commit_url.endswith("/commit/abc")


def test_push_keeps_an_existing_card_and_can_skip_the_card(saved_folder: Path, monkeypatch) -> None:
    use_fake_api(monkeypatch)
    (saved_folder / "README.md").write_text("my own card")
    push_folder(saved_folder, "me/tiny", token="hf_x")
    assert (saved_folder / "README.md").read_text() == "my own card"
    (saved_folder / "README.md").unlink()
    push_folder(saved_folder, "me/tiny", token="hf_x", write_card=False)
    operations = FakeApi.instances[-1].calls[-1][1]["operations"]
    assert "README.md" not in {operation.path_in_repo for operation in operations}
    assert FakeApi.instances[-1].names() == ["whoami", "create_repo", "create_commit"]  # main: no branch


def test_push_refuses_offline_before_any_call(saved_folder: Path, monkeypatch) -> None:
    use_fake_api(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUploadError, match="offline mode.*nothing was uploaded"):
        push_folder(saved_folder, "me/tiny", token="hf_x")
    assert FakeApi.instances[0].calls == []
    assert not (saved_folder / "README.md").exists()


def test_push_refuses_without_a_token(saved_folder: Path, monkeypatch) -> None:
    use_fake_api(monkeypatch)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(HubUploadError, match="no Hugging Face token"):
        push_folder(saved_folder, "me/tiny")
    assert FakeApi.instances[0].calls == []


def test_push_stops_when_the_hub_is_unreachable(saved_folder: Path, monkeypatch) -> None:
    use_fake_api(monkeypatch, whoami_error=ConnectionError("no route to host"))
    with pytest.raises(HubUploadError, match="cannot reach the Hugging Face Hub.*no route to host"):
        push_folder(saved_folder, "me/tiny", token="hf_x")
    assert FakeApi.instances[0].names() == ["whoami"]


def test_a_failed_commit_is_reported_as_no_commit(saved_folder: Path, monkeypatch) -> None:
    use_fake_api(monkeypatch, commit_error=OSError("upload interrupted"))
    with pytest.raises(HubUploadError, match="no commit was made: upload interrupted"):
        push_folder(saved_folder, "me/tiny", token="hf_x")


def test_push_checks_its_arguments(saved_folder: Path, tmp_path: Path, monkeypatch) -> None:
    use_fake_api(monkeypatch)
    with pytest.raises(ValueError, match="invalid repo_id"):
        push_folder(saved_folder, "me/bad name", token="hf_x")
    with pytest.raises(ValueError, match="namespace/name"):
        push_folder(saved_folder, "tiny", token="hf_x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        push_folder(tmp_path / "missing", "me/tiny", token="hf_x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_folder(tmp_path / "empty", "me/tiny", token="hf_x")
    assert all(api.calls == [] for api in FakeApi.instances)


# ------------------------------------------------------------------------------------------------ Spaces

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_push_space_commits_a_ready_gradio_space_in_one_commit(monkeypatch) -> None:
    use_fake_api(monkeypatch)
    commit = push_space("me/tiny-chat", "me/tiny", model_revision="dev", private=True, token="hf_x")
    (api,) = FakeApi.instances
    assert api.names() == ["whoami", "create_repo", "create_commit"]
    create_repo, create_commit = api.calls[1][1], api.calls[2][1]
    assert create_repo["repo_id"] == "me/tiny-chat" and create_repo["repo_type"] == "space"
    assert create_repo["space_sdk"] == "gradio" and create_repo["private"] is True
    assert create_commit["repo_type"] == "space" and commit.commit_url.endswith("/commit/abc")
    files = {operation.path_in_repo: operation.path_or_fileobj for operation in create_commit["operations"]}

    meta, body = front_matter(files["README.md"].decode())
    (gradio_spec,) = [spec for spec in PYPROJECT["project"]["optional-dependencies"]["app"] if spec.startswith("gradio")]
    (floor,) = [spec.version for spec in Requirement(gradio_spec).specifier if spec.operator == ">="]
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["models"] == ["me/tiny"]
    assert meta["sdk_version"] == floor + ".0" * (2 - floor.count("."))
    assert "(https://huggingface.co/me/tiny)" in body
    # requirements.txt: the package's own dependencies with their ranges, as pyproject.toml states them
    requirements = files["requirements.txt"].decode().split()
    assert {str(Requirement(line)) for line in requirements} == {
        str(Requirement(line)) for line in PYPROJECT["project"]["dependencies"]
    }
    app = files["app.py"].decode()
    compile(app, "app.py", "exec")
    assert "MODEL_ID = 'me/tiny'" in app and "REVISION = 'dev'" in app and "from phantom_hf.app import launch" in app
    # the installed package travels with the Space, file for file
    package = Path(phantom_hf.__file__).parent
    for name in ("__init__.py", "app.py", "prompts.py"):
        assert files[f"phantom_hf/{name}"] == (package / name).read_bytes()
    modeling = Path(phantom_hf.modeling.__file__).parent
    assert files["phantom_hf/modeling/modeling_phantom.py"] == (modeling / "modeling_phantom.py").read_bytes()
    assert "phantom_hf/hub_cards/model_card.md" in files
    assert not any("__pycache__" in name for name in files)


def test_push_space_refuses_before_any_call(monkeypatch) -> None:
    use_fake_api(monkeypatch)
    with pytest.raises(ValueError, match="invalid space_id"):
        push_space("me/bad name", "me/tiny", token="hf_x")
    with pytest.raises(ValueError, match="model_id must be 'namespace/name'"):
        push_space("me/chat", "tiny", token="hf_x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUploadError, match="offline mode"):
        push_space("me/chat", "me/tiny", token="hf_x")
    assert all(api.calls == [] for api in FakeApi.instances)


def test_write_space_folder_needs_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="is not empty"):
        hub.write_space_folder(tmp_path / "space", "me/tiny")


def test_cli_push_with_space_pushes_the_model_then_its_space(saved_folder: Path, monkeypatch, capsys) -> None:
    use_fake_api(monkeypatch)
    status = cli.main(["push", str(saved_folder), "me/tiny", "--token", "hf_x", "--revision", "v1", "--space", "tiny-chat"])
    out = capsys.readouterr().out
    assert status == 0 and "pushed the Space me/tiny-chat" in out
    model_api, space_api = FakeApi.instances
    assert model_api.calls[-1][1]["repo_type"] == "model" and model_api.calls[-1][1]["repo_id"] == "me/tiny"
    assert space_api.calls[-1][1]["repo_type"] == "space" and space_api.calls[-1][1]["repo_id"] == "me/tiny-chat"
    app = {op.path_in_repo: op.path_or_fileobj for op in space_api.calls[-1][1]["operations"]}["app.py"].decode()
    assert "MODEL_ID = 'me/tiny'" in app and "REVISION = 'v1'" in app

    FakeApi.instances.clear()
    status = cli.main(["push", str(saved_folder), "me/tiny", "--token", "hf_x", "--space", "bad name"])
    assert status == 2 and "invalid --space 'me/bad name'" in capsys.readouterr().err
    assert FakeApi.instances == []  # nothing pushed, not even the model
