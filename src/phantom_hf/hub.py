"""Model cards and uploads to the Hugging Face Hub.

`render_model_card` fills the template shipped in `phantom_hf.hub_cards` (YAML front matter for the Hub plus
a body: what the model is, how to load it, the training recipe and hyper-parameters, evaluation results,
citation). `write_model_card` writes it as `README.md` into a saved folder. `push_folder` uploads a saved
folder as one commit, after checking — before anything is sent — that a token is there and the Hub is reachable.
`write_space_folder` writes a Gradio Space that serves a pushed model with the chat page of `phantom_hf.app`, and
`push_space` pushes one.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import re
import tempfile
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    ModelCardData,
    SpaceCard,
    SpaceCardData,
    constants,
    get_token,
)
from huggingface_hub.utils import HFValidationError, get_session, validate_repo_id
from transformers import PretrainedConfig

from .modeling import PhantomConfig

DEFAULT_LICENSE = "apache-2.0"
DEFAULT_TAGS = ("phantom", "vision-language", "image-text-to-text", "custom_code")
CARD_NAME = "README.md"
# Seconds `push_folder` waits for any answer of the Hub (connecting, each read and write) before giving up.
DEFAULT_HUB_TIMEOUT = 60.0
# Files that describe a local copy, not the model: never uploaded.
_IGNORED_PARTS = (".git", ".cache")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# TrainingArguments / CPOConfig fields worth recording in a card, in this order.
TRAINING_ARGUMENT_FIELDS = (
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "optim",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "bf16",
    "fp16",
    "loss_type",
    "beta",
    "simpo_gamma",
    "cpo_alpha",
    "max_length",
    "seed",
)


class HubUploadError(RuntimeError):
    """Raised when an upload cannot start (no token, offline, Hub unreachable) or fails."""


def _load_config(source: Any) -> PretrainedConfig:
    """A config from a model, a config, a dict (`config.json` contents) or a saved folder."""
    if isinstance(source, PretrainedConfig):
        return source
    if hasattr(source, "config") and isinstance(source.config, PretrainedConfig):
        return source.config
    if isinstance(source, Mapping):
        values = dict(source)
        values.pop("model_type", None)
        return PhantomConfig(**values)
    if isinstance(source, (str, Path)):
        path = Path(source)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {str(source)!r}: pass a saved model folder")
        return _load_config(json.loads(config_file.read_text()))
    raise TypeError(
        f"expected a model, a PretrainedConfig, a config dict or a saved folder, got {type(source).__name__}"
    )


def _count_parameters(source: Any) -> int | None:
    """Parameters of a model, or of the safetensors files of a saved folder; None when unknown."""
    if hasattr(source, "parameters") and callable(source.parameters):
        return sum(parameter.numel() for parameter in source.parameters())
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        files = sorted(Path(source).glob("*.safetensors"))
        if not files:
            return None
        from safetensors import safe_open

        total = 0
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        count = 1
                        for size in handle.get_slice(name).get_shape():
                            count *= size
                        total += count
            except Exception:  # an unreadable weights file: the card just leaves the count out
                return None
        return total
    return None


def _human_count(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count:,} ({count / scale:.1f}{unit})"
    return f"{count:,}"


def infer_base_model(config: PretrainedConfig) -> str | None:
    """The Hub id the weights were loaded from (`config._name_or_path`), when it is one and not a local path."""
    name = getattr(config, "_name_or_path", "") or ""
    if _REPO_ID.match(name) and not Path(name).exists():
        return name
    return None


def _architecture(config: PretrainedConfig) -> dict[str, Any]:
    text = config.text_config
    vision = config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    def pair(value: Any) -> str:
        return "x".join(str(v) for v in value) if isinstance(value, (list, tuple)) else f"{value}x{value}"

    return {
        "text_model_type": text.model_type,
        "text_layers": text.num_hidden_layers,
        "text_hidden_size": text.hidden_size,
        "text_heads": text.num_attention_heads,
        "text_kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "head_dim": head_dim,
        "vocab_size": text.vocab_size,
        "vision_model_type": vision.model_type,
        "vision_layers": vision.num_hidden_layers,
        "vision_hidden_size": vision.hidden_size,
        "image_size": pair(vision.image_size),
        "patch_size": pair(vision.patch_size),
        "projector_type": getattr(config, "projector_type", "phantom"),
        "downsample_ratio": getattr(config, "downsample_ratio", None),
        "image_seq_length": getattr(config, "image_seq_length", None),
        "phantom_dimension": getattr(config, "phantom_dimension", True),
        "phantom_eta": getattr(config, "phantom_eta", None),
        "phantom_mixing": getattr(config, "phantom_mixing", None),
        "phantom_expansion": getattr(config, "phantom_expansion", None),
        "phantom_cache_mode": getattr(config, "phantom_cache_mode", None),
    }


def _as_list(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _table_cell(value: Any) -> str:
    """A value as one Markdown table cell (pipes escaped, floats shortened, newlines removed)."""
    if isinstance(value, float):
        text = f"{value:.6g}"
        if text.lstrip("-").isdigit():
            text += ".0"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def describe_training_args(args: Any, **extra: Any) -> dict[str, Any]:
    """The card-worthy hyper-parameters of a `TrainingArguments` (or TRL config) actually used, plus `extra`.

    Fields left at values that mean "unused" (None, 0 warm-up, -1 max_steps) are omitted.
    """
    values: dict[str, Any] = {}
    for field in TRAINING_ARGUMENT_FIELDS:
        value = getattr(args, field, None)
        if value is None or (field == "max_steps" and value == -1) or (field.startswith("warmup") and not value):
            continue
        if field in ("bf16", "fp16", "gradient_checkpointing") and not value:
            continue
        if field == "lr_scheduler_kwargs" and not value:
            continue
        if field == "num_train_epochs" and (getattr(args, "max_steps", -1) or -1) > 0:
            continue  # max_steps overrides the epochs
        values[field] = getattr(value, "value", value)  # enums -> their string
    values.update(extra)
    return values


def render_model_card(config: Any, **info: Any) -> str:
    """The README text (YAML front matter + Markdown body) of a Phantom checkpoint.

    Args:
        config: a Phantom model, its `PhantomConfig`, a `config.json` dict, or a saved folder.
        **info: optional facts about the checkpoint:
            `model_name` (title), `repo_id` (used in the code snippets), `description` (a paragraph),
            `base_model` (Hub id; default: inferred from `config._name_or_path`), `datasets` (Hub ids),
            `license` (default "apache-2.0"), `tags` (added to the defaults), `language`,
            `training` ({step name: {hyper-parameter: value}}; see `describe_training_args`),
            `training_data` (a sentence), `eval_results` ({metric: value}), `num_parameters`,
            `example_question`.
    """
    known = {
        "model_name", "repo_id", "description", "base_model", "datasets", "license", "tags", "language",
        "training", "training_data", "eval_results", "num_parameters", "example_question",
    }  # fmt: skip
    unknown = sorted(set(info) - known)
    if unknown:
        raise TypeError(f"render_model_card got unknown fields {unknown}; known: {sorted(known)}")
    resolved = _load_config(config)
    if not hasattr(resolved, "text_config") or not hasattr(resolved, "vision_config"):
        raise TypeError(f"expected a Phantom config with text_config and vision_config, got {type(resolved).__name__}")
    for field in ("training", "eval_results"):
        if info.get(field) is not None and not isinstance(info[field], Mapping):
            raise TypeError(f"{field} must be a mapping, got {type(info[field]).__name__}")
    training = info.get("training") or {}
    for step_name, params in training.items():
        if not isinstance(params, Mapping):
            raise TypeError(f"training[{step_name!r}] must map hyper-parameter names to values")

    base_model = info.get("base_model") or infer_base_model(resolved)
    repo_id = info.get("repo_id") or "path/to/phantom-model"
    model_name = info.get("model_name") or (repo_id.split("/")[-1] if info.get("repo_id") else "Phantom model")
    num_parameters = info.get("num_parameters")
    if num_parameters is None:
        num_parameters = _count_parameters(config)
    tags = list(DEFAULT_TAGS) + [tag for tag in _as_list(info.get("tags")) if tag not in DEFAULT_TAGS]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=info.get("license") or DEFAULT_LICENSE,
        tags=tags,
        base_model=base_model,
        datasets=_as_list(info.get("datasets")) or None,
        language=info.get("language"),
        model_name=model_name,
    )
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    template = environment.from_string(resources.files("phantom_hf.hub_cards").joinpath("model_card.md").read_text())
    content = template.render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id,
        description=info.get("description"),
        base_model=base_model,
        arch=_architecture(resolved),
        num_parameters=_human_count(num_parameters) if isinstance(num_parameters, int) else num_parameters,
        training={
            str(step): {str(key): _table_cell(value) for key, value in params.items()}
            for step, params in training.items()
        },
        training_data=info.get("training_data"),
        eval_results={str(key): _table_cell(value) for key, value in (info.get("eval_results") or {}).items()},
        example_question=info.get("example_question") or "What is in this image?",
    )
    content = re.sub(r"\n{3,}", "\n\n", content)
    ModelCard(content)  # parses the front matter: a broken template fails here, not on the Hub
    return content


def write_model_card(folder: str | Path, model_or_config: Any = None, **info: Any) -> Path:
    """Render the card of `model_or_config` (default: the folder's `config.json`) into `folder/README.md`.

    Meant to be called right after `save_pretrained(folder)`; returns the path written.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder")
    source = folder if model_or_config is None else model_or_config
    path = folder / CARD_NAME
    path.write_text(render_model_card(source, **info), encoding="utf-8")
    return path


def save_model_folder(
    folder: str | Path,
    model: Any,
    processor: Any,
    card: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, Any] | None = None,
) -> Path:
    """Save `model` and `processor` into `folder` (a Hub-ready folder: weights, config, remote code, processor) and,
    with `card` (fields of `render_model_card`), its model card `README.md`. Returns the folder. `state_dict`: the
    weights to write instead of the model's own (the gathered full state of a sharded model,
    `trainer.save_trained_model`)."""
    folder = Path(folder)
    model.save_pretrained(folder, state_dict=state_dict)
    processor.save_pretrained(folder)
    if card is not None:
        write_model_card(folder, model, **card)
    return folder


def folder_files(folder: str | Path) -> list[str]:
    """Relative POSIX paths of the regular files under `folder` (sorted), `.git/` and `.cache/` excluded."""
    root = Path(folder)
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part in _IGNORED_PARTS for part in relative.parts) or not path.is_file():
            continue
        files.append(relative.as_posix())
    return sorted(files)


def _check_upload_possible(api: HfApi, token: str | None, timeout: float | None = None) -> str:
    """Fail before any upload when offline, without a token, or when the Hub rejects the token."""
    if constants.HF_HUB_OFFLINE:
        raise HubUploadError("the Hub is in offline mode (HF_HUB_OFFLINE=1): unset it to push, nothing was uploaded")
    token = token or get_token()
    if not token:
        raise HubUploadError(
            "no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`; nothing was uploaded"
        )
    try:
        api.whoami(token=token)
    except Exception as error:  # network errors, 401s: all mean "cannot upload"
        if timeout is not None and _is_timeout(error):
            raise HubUploadError(
                f"the Hugging Face Hub at {api.endpoint} did not answer within {timeout:g} s "
                "(set a longer wait with --timeout); nothing was uploaded"
            ) from error
        raise HubUploadError(
            f"cannot reach the Hugging Face Hub with this token ({type(error).__name__}: {error}); nothing was uploaded"
        ) from error
    return token


def _is_timeout(error: BaseException) -> bool:
    """Whether `error` (or its cause) is an HTTP client's timeout (httpx' `TimeoutException` and kin)."""
    while error is not None:
        if any("Timeout" in cls.__name__ for cls in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def hub_timeout(seconds: float | None) -> Iterator[None]:
    """Bound every wait of huggingface_hub's HTTP requests (connecting, each read and write) to `seconds` while the
    block runs; its shared client waits forever by default, so a Hub that accepts a connection and never answers
    would hang the caller."""
    session = get_session()
    previous = session.timeout
    session.timeout = seconds
    try:
        yield
    finally:
        session.timeout = previous


def check_repo_id(repo_id: str, name: str = "repo_id") -> None:
    """A `ValueError` naming `name` unless `repo_id` is a valid Hub id of the form namespace/name."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid {name} {repo_id!r}: {error}") from error
    if "/" not in repo_id:
        raise ValueError(f"{name} must be 'namespace/name', got {repo_id!r}")


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    write_card: bool = True,
    timeout: float | None = DEFAULT_HUB_TIMEOUT,
) -> Any:
    """Upload every file of a saved model folder to `repo_id` as a single commit.

    The repository (and the branch `revision`, when given) are created if needed. A folder without
    `README.md` first gets a rendered model card (`write_card`). Offline, without a token, or when the Hub
    is unreachable, `HubUploadError` is raised before anything is sent. The files go in one
    `create_commit`: if an upload fails, no commit is made and the repository is left as it was.

    Every HTTP wait (the token check, each request of the upload) is bounded by `timeout` seconds (None: no
    bound): a Hub that accepts the connection but never answers fails the push instead of hanging it.

    Returns the `CommitInfo` of the commit.
    """
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
    with hub_timeout(timeout):
        return _push_folder(folder, repo_id, private, commit_message, revision, token, write_card, timeout)


def _push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool | None,
    commit_message: str | None,
    revision: str | None,
    token: str | None,
    write_card: bool,
    timeout: float | None,
) -> Any:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder")
    check_repo_id(repo_id)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json: save the model there with save_pretrained first")

    api = HfApi()
    token = _check_upload_possible(api, token, timeout)
    if write_card and not (folder / CARD_NAME).is_file():
        write_model_card(folder, repo_id=repo_id)
    files = folder_files(folder)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {folder.name} with phantom-hf",
            revision=revision,
            token=token,
            repo_type="model",
        )
    except Exception as error:
        raise HubUploadError(f"upload of {str(folder)!r} to {repo_id!r} failed, no commit was made: {error}") from error


# ---------------------------------------------------------------------------------------------- Spaces

_SPACE_APP = '''"""The chat page of {model_id} (a Phantom model, arXiv 2409.14713), served by `phantom_hf.app`.

Written by `phantom-hf push --space`. The `phantom_hf` folder beside this file is the phantom-hf package that wrote
it. A private model needs a read token in the Space's HF_TOKEN secret.
"""

from transformers import AutoModelForImageTextToText, AutoProcessor

import phantom_hf  # noqa: F401  registers Phantom with the Auto classes
from phantom_hf.app import launch

MODEL_ID = {model_id!r}
REVISION = {revision!r}

model = AutoModelForImageTextToText.from_pretrained(MODEL_ID, revision=REVISION)
processor = AutoProcessor.from_pretrained(MODEL_ID, revision=REVISION)
# Address and port: Gradio reads GRADIO_SERVER_NAME and GRADIO_SERVER_PORT, which Spaces set.
launch(model, processor, title=MODEL_ID)
'''


def _space_requirements() -> tuple[list[str], str]:
    """The installed phantom-hf's own requirements (the ranges it is tested with) and the Gradio version of its
    `app` extra's floor (a Space installs Gradio itself, at the card's `sdk_version`)."""
    from packaging.requirements import Requirement

    requirements, gradio_version = [], None
    for line in importlib.metadata.requires("phantom-hf") or []:
        requirement = Requirement(line)
        if requirement.marker is None:
            requirements.append(str(requirement))
        elif requirement.name == "gradio" and requirement.marker.evaluate({"extra": "app"}):
            floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
            gradio_version = floors[0] if floors else None
    if gradio_version is None:
        raise RuntimeError("the installed phantom-hf names no Gradio floor in its `app` extra: reinstall it")
    parts = gradio_version.split(".")
    return requirements, ".".join(parts + ["0"] * (3 - len(parts)))


def _package_files() -> dict[str, Path]:
    """The phantom-hf package as installed: relative path in a Space -> source file (Python files and model cards;
    `phantom_hf.modeling` and `phantom_hf.hub_cards` may live elsewhere in an editable install)."""
    import phantom_hf
    from phantom_hf import hub_cards, modeling

    files: dict[str, Path] = {}
    for package, name, patterns in (
        (phantom_hf, "phantom_hf", ("*.py",)),
        (modeling, "phantom_hf/modeling", ("*.py",)),
        (hub_cards, "phantom_hf/hub_cards", ("*.py", "*.md")),
    ):
        root = Path(package.__file__).parent
        for pattern in patterns:
            for path in sorted(root.glob(pattern)):
                files[f"{name}/{path.name}"] = path
    return files


def write_space_folder(folder: str | Path, model_id: str, revision: str | None = None) -> list[str]:
    """Write a Gradio Space that serves `model_id` (at `revision`) with the chat page of `phantom_hf.app` into the
    empty or new `folder`: `app.py`, `requirements.txt` (phantom-hf's requirements, its tested ranges), `README.md`
    (the Space card: `sdk: gradio` at the `app` extra's Gradio version, the model linked) and the installed
    `phantom_hf` package itself (it is not on PyPI). Returns the files written, relative to `folder`."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{str(folder)!r} is not empty: a Space folder is written into a new or empty folder")
    requirements, gradio_version = _space_requirements()
    card = SpaceCard.from_template(
        SpaceCardData(
            title=model_id.split("/")[-1][:30],
            emoji="👻",
            colorFrom="indigo",
            colorTo="gray",
            sdk="gradio",
            sdk_version=gradio_version,
            app_file="app.py",
            models=[model_id],
            license=DEFAULT_LICENSE,
            short_description="Chat with a Phantom vision-language model",
        ),
        template_str=(
            "---\n{{ card_data }}\n---\n\n# {{ model_id }}\n\nA chat page for the Phantom vision-language model "
            "[{{ model_id }}](https://huggingface.co/{{ model_id }}) "
            "([Phantom of Latent](https://arxiv.org/abs/2409.14713)): upload images, ask, and read the answer as it "
            "is generated. Written by `phantom-hf push --space`.\n"
        ),
        model_id=model_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(_SPACE_APP.format(model_id=model_id, revision=revision), encoding="utf-8")
    (folder / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    card.save(folder / CARD_NAME)
    for name, source in _package_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(source.read_bytes())
    return folder_files(folder)


def push_space(
    space_id: str,
    model_id: str,
    model_revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    timeout: float | None = DEFAULT_HUB_TIMEOUT,
) -> Any:
    """Push a Gradio Space serving the Hub model `model_id` (`write_space_folder`) to `space_id` as one commit (the
    Space is created when missing). Refuses before sending anything as `push_folder` does; returns the `CommitInfo`."""
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
    check_repo_id(space_id, "space_id")
    check_repo_id(model_id, "model_id")
    with hub_timeout(timeout):
        api = HfApi()
        token = _check_upload_possible(api, token, timeout)
        with tempfile.TemporaryDirectory(prefix="phantom-hf-space-") as staging:
            files = write_space_folder(staging, model_id, model_revision)
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=(Path(staging) / name).read_bytes())
                for name in files
            ]
        try:
            api.create_repo(
                space_id, private=private, exist_ok=True, repo_type="space", space_sdk="gradio", token=token
            )
            return api.create_commit(
                space_id,
                operations=operations,
                commit_message=commit_message or f"Chat page for {model_id} with phantom-hf",
                token=token,
                repo_type="space",
            )
        except Exception as error:
            raise HubUploadError(f"upload of the Space {space_id!r} failed, no commit was made: {error}") from error


__all__ = [
    "DEFAULT_HUB_TIMEOUT",
    "check_repo_id",
    "HubUploadError",
    "describe_training_args",
    "folder_files",
    "hub_timeout",
    "infer_base_model",
    "push_folder",
    "push_space",
    "render_model_card",
    "save_model_folder",
    "write_model_card",
    "write_space_folder",
]
