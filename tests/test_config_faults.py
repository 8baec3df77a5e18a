"""A saved config that cannot be right is refused when it is read, naming the folder and the field: a missing
sub-config (never the 7B-sized defaults), a wrong-typed field, an `image_seq_length` that disagrees with the
vision settings (a consistent one, as InternVL configs carry, is accepted)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from phantom_hf import PhantomConfig, PhantomForConditionalGeneration

from .conftest import make_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    make_model(seed=0).save_pretrained(folder)
    return folder


def edited(saved: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(text_config=None), "text_config is missing \\(or null\\)"),
        (lambda c: c.pop("vision_config"), "vision_config is missing \\(or null\\)"),
        (lambda c: c.update(vision_feature_layer="-1"), "vision_feature_layer must be an int .* got '-1'"),
        (lambda c: c.update(vision_feature_layer=5), "vision_feature_layer must be an int indexing the vision tower's 1\\+1 hidden states"),
        (lambda c: c.update(downsample_ratio="half"), "downsample_ratio must be 1/k for an integer k, got 'half'"),
        (lambda c: c.update(projector_hidden_act=3), "projector_hidden_act must name a transformers activation"),
        (lambda c: c.update(multimodal_projector_bias="yes"), "multimodal_projector_bias must be True or False, got 'yes'"),
        (lambda c: c.update(image_seq_length=256), "image_seq_length=256 disagrees with the 4 vision tokens per tile"),
    ],
)
def test_a_saved_config_that_cannot_be_right_is_refused_naming_folder_and_field(saved: Path, tmp_path: Path, change, message: str) -> None:
    folder = edited(saved, tmp_path, change)
    named = re.escape(f"{folder}: config.json: ") + message
    with pytest.raises(ValueError, match=named):
        PhantomConfig.from_pretrained(folder)
    with pytest.raises(ValueError, match=named):
        AutoConfig.from_pretrained(folder, trust_remote_code=True)
    if "missing" not in message:  # a model is built only from configs that pass (a missing one would be 7B-sized)
        with pytest.raises(ValueError, match=named):
            PhantomForConditionalGeneration.from_pretrained(folder)


def test_a_consistent_image_seq_length_is_accepted(saved: Path, tmp_path: Path) -> None:
    folder = edited(saved, tmp_path, lambda c: c.update(image_seq_length=4))
    loaded = PhantomForConditionalGeneration.from_pretrained(folder)
    reference = PhantomForConditionalGeneration.from_pretrained(saved)
    assert loaded.config.image_seq_length == 4 and "image_seq_length" not in loaded.config.to_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_sub_config_defaults_remain_for_configs_built_in_code() -> None:
    config = PhantomConfig()
    assert config.text_config.model_type == "qwen2" and config.vision_config.model_type == "internvl_vision"
    with pytest.raises(ValueError, match="vision_feature_layer must be an int"):
        PhantomConfig(vision_feature_layer=1.0)


@pytest.mark.parametrize("keep", [0, 20, -100])
def test_a_truncated_weights_file_is_named_by_from_pretrained(saved: Path, tmp_path: Path, keep: int) -> None:
    folder = edited(saved, tmp_path, lambda c: None)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(ValueError, match=re.escape(f"weights file {weights}, truncated or corrupt, cannot be read")):
        PhantomForConditionalGeneration.from_pretrained(folder)
