"""`phantom-hf convert --from llava`: LLaVA-style checkpoints (LLaVA-1.5 mlp2x_gelu, Xmodel-VLM XDP; arXiv 2405.09215).

Random tiny checkpoints are written in the LLaVA layout (`model.vision_tower.vision_tower.vision_model.*`,
`model.mm_projector.*`, `model.layers.*`, `lm_head`), converted, and their logits compared with a computation
written here from the original names: transformers' `CLIPVisionModel` and `LlamaForCausalLM` loaded from folders
that hold the original tensors, the projector applied by hand. Then the "+Phantom Dimension" twin of the
converted baseline: same logits at initialisation, and one `PhantomPOTrainer` stage-1 step trains only its new parts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, Image, List
from PIL import Image as PILImage
from safetensors.torch import save_file
from transformers import AutoProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from phantom_hf import PhantomForConditionalGeneration
from phantom_hf.convert import add_convert_arguments, convert_checkpoint, run_convert
from phantom_hf.modeling.processing_phantom import VICUNA_V1_CHAT_TEMPLATE
from phantom_hf.tokenization import build_tokenizer
from phantom_hf.trainer import PhantomPOConfig, PhantomPOTrainer

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=7)
TEXT = dict(
    vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
WORDS = ["what", "is", "it", "?", "a", "cat", "dog"]
SPECIALS = ["<unk>", "<s>", "</s>"]
PROJECTOR_NAMES = {"xdpnet": "model.mm_projector.mlp.", "mlp2x_gelu": "model.mm_projector."}


def randomised(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Weights large enough for every module to matter: norm weights around 1, everything else N(0, 0.2^2)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        noise = torch.randn(tensor.shape, generator=generator)
        out[name] = 1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise
    return out


def llava_folder(root: Path, projector: str = "xdpnet", tokenizer: bool = True, seed: int = 0) -> Path:
    """A LLaVA-layout checkpoint (config.json, model.safetensors, tokenizer) plus `reference/`: the original CLIP and
    Llama tensors under their own names, and the projector's tensors."""
    src = root / f"llava-{projector}"
    src.mkdir()
    clip = randomised({k.removeprefix("vision_model."): v for k, v in CLIPVisionModel(CLIPVisionConfig(**VISION)).state_dict().items()}, seed)
    llama = randomised(LlamaForCausalLM(LlamaConfig(**TEXT)).state_dict(), seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    group = 4 if projector == "xdpnet" else 1
    hidden, channels = TEXT["hidden_size"], VISION["hidden_size"]
    mm = {
        "0.weight": 0.1 * torch.randn(hidden, group * channels, generator=generator),
        "0.bias": 0.1 * torch.randn(hidden, generator=generator),
        "2.weight": 0.1 * torch.randn(hidden, hidden, generator=generator),
        "2.bias": 0.1 * torch.randn(hidden, generator=generator),
    }
    state = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in clip.items()}
    state |= llama
    state |= {PROJECTOR_NAMES[projector] + k: v for k, v in mm.items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # a derived buffer old code saved
    save_file(state, src / "model.safetensors")
    config = {
        "architectures": ["XmodelLMForCausalLM"], "model_type": "xmodelvlm", **TEXT,
        "mm_projector_type": projector, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_hidden_size": channels, "mm_vision_tower": "tiny-clip", "mm_use_im_start_end": False,
        "image_aspect_ratio": "pad", "vision_config": {"model_type": "clip_vision_model", **VISION},
    }  # fmt: skip
    (src / "config.json").write_text(json.dumps(config))
    if tokenizer:
        build_tokenizer(WORDS, SPECIALS, pad_token="<unk>", eos_token="</s>", bos_token="<s>").save_pretrained(src)

    reference = root / f"reference-{projector}"
    (reference / "clip").mkdir(parents=True)
    save_file({f"vision_model.{k}": v for k, v in clip.items()}, reference / "clip" / "model.safetensors")  # openai names
    CLIPVisionConfig(**VISION).save_pretrained(reference / "clip")
    (reference / "llama").mkdir()
    save_file(llama, reference / "llama" / "model.safetensors")
    LlamaConfig(**TEXT).save_pretrained(reference / "llama")
    torch.save(mm, reference / "projector.pt")
    return src


def reference_logits(src: Path, projector: str, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The LLaVA forward from the original tensors: CLIP layer -2 without CLS, the projector by hand (XDP groups 4
    consecutive tokens), the features spliced in at the placeholders, Llama."""
    reference = src.parent / f"reference-{projector}"
    clip = CLIPVisionModel.from_pretrained(reference / "clip").eval()
    llama = LlamaForCausalLM.from_pretrained(reference / "llama").eval()
    mm = torch.load(reference / "projector.pt")
    with torch.no_grad():
        features = clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        if projector == "xdpnet":
            tiles, tokens, channels = features.shape
            features = features.reshape(tiles, tokens // 4, 4 * channels)
            features = F.linear(F.mish(F.linear(features, mm["0.weight"], mm["0.bias"])), mm["2.weight"], mm["2.bias"])
        else:
            features = F.linear(F.gelu(F.linear(features, mm["0.weight"], mm["0.bias"])), mm["2.weight"], mm["2.bias"])
        placeholder = input_ids == image_token_id
        embeds = llama.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))
        embeds[placeholder] = features.reshape(-1, features.shape[-1])
        return llama(inputs_embeds=embeds).logits


@pytest.mark.parametrize("projector", ["xdpnet", "mlp2x_gelu"])
def test_converted_llava_checkpoint_reproduces_the_original_computation(tmp_path: Path, projector: str) -> None:
    with_tokenizer = projector == "xdpnet"
    src = llava_folder(tmp_path, projector, tokenizer=with_tokenizer)
    config = convert_checkpoint(src, tmp_path / "out", source="llava")
    assert (config.projector_type, config.vision_feature_layer, config.phantom_dimension) == (
        {"xdpnet": "xdp", "mlp2x_gelu": "mlp2x_gelu"}[projector], -2, False,
    )  # fmt: skip
    model = PhantomForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    image = PILImage.new("RGB", (40, 24), (200, 30, 60))
    if with_tokenizer:  # <IMG_CONTEXT> joins the 13-token tokenizer at id 13, inside the 40-row embedding: no growth
        processor = AutoProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True)
        assert processor.chat_template == VICUNA_V1_CHAT_TEMPLATE and processor.image_processor.do_pad
        assert config.image_token_id == 13 and config.text_config.vocab_size == 40
        prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nwhat is it?"}], tokenize=False, add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        input_ids, pixel_values = inputs["input_ids"], inputs["pixel_values"]
        assert int((input_ids == 13).sum()) == config.image_seq_length == 4
    else:  # no tokenizer: the placeholder takes id 40 and the embedding and head grow by one (mean) row
        assert not (tmp_path / "out" / "processor_config.json").exists()
        assert config.image_token_id == 40 and config.text_config.vocab_size == 41
        input_ids = torch.tensor([[1, 5, 6, *[40] * 16, 7, 8]])
        pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    expected = reference_logits(src, projector, input_ids, pixel_values, config.image_token_id)
    torch.testing.assert_close(logits[..., :40], expected, rtol=1e-4, atol=1e-4)
    if not with_tokenizer:
        torch.testing.assert_close(logits[..., 40], expected.mean(-1), rtol=1e-4, atol=1e-4)
        embedding = model.get_input_embeddings().weight
        torch.testing.assert_close(embedding[40], embedding[:40].mean(0))


def test_refusals_write_nothing(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    src = llava_folder(tmp_path)
    # copies: safetensors 0.4.3 (our floor) maps the loaded tensors onto the file, which the cases below overwrite
    state = {name: tensor.clone() for name, tensor in load_file(src / "model.safetensors").items()}
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
                    r"1 target tensor\(s\) left unfilled: model\.language_model\.layers\.1\.mlp\.up_proj\.weight"),
        "extra": ({**state, "model.mm_projector.mlp.4.weight": torch.zeros(2)},
                  r"1 source tensor\(s\) without a target: model\.mm_projector\.mlp\.4\.weight"),
        "shape": ({**state, "model.mm_projector.mlp.2.weight": torch.zeros(64, 32)},
                  r"model\.mm_projector\.mlp\.2\.weight: expected \(64, 64\), found \(64, 32\)"),
    }  # fmt: skip
    for case, (tensors, message) in cases.items():
        save_file(tensors, src / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            convert_checkpoint(src, tmp_path / case, source="llava")
        assert not (tmp_path / case).exists()
    save_file(state, src / "model.safetensors")
    published = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**published, "mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match="mm_projector_type 'linear' is not supported"):
        convert_checkpoint(src, tmp_path / "linear", source="llava")
    (src / "config.json").write_text(json.dumps(published))
    with pytest.raises(ValueError, match="not a LLaVA-style baseline"):
        convert_checkpoint(src, tmp_path / "preset", preset="phantom-0.5b", source="llava")
    with pytest.raises(ValueError, match="the checkpoint is not a xmodel-vlm-1.1b: text_config.hidden_size"):
        convert_checkpoint(src, tmp_path / "preset", preset="xmodel-vlm-1.1b", source="llava")
    with pytest.raises(ValueError, match="convert it with source='llava'"):
        convert_checkpoint(src, tmp_path / "preset", preset="xmodel-vlm-1.1b")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llava-xdpnet", "reference-xdpnet"]


def test_cli_from_llava(tmp_path: Path, capsys) -> None:
    src = llava_folder(tmp_path)
    args = add_convert_arguments(argparse.ArgumentParser()).parse_args([str(src), str(tmp_path / "out"), "--from", "llava"])
    assert run_convert(args) == 0
    assert "llama 2 layers x 64, image_token_id=13" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["projector_type"], saved["projector_group_size"], saved["phantom_dimension"]) == ("xdp", 4, False)


def test_phantom_twin_of_the_converted_baseline(tmp_path: Path) -> None:
    """"+Phantom Dimension" (paper Table 5): the converted baseline loaded with phantom_dimension=True gets fresh
    Phantom modules, reproduces the baseline's logits at initialisation (eta = 1e-4), and one PhantomPOTrainer
    stage-1 step moves the Phantom modules and the projector while the LLM and the vision tower stay bit-identical."""
    src = llava_folder(tmp_path)
    convert_checkpoint(src, tmp_path / "out", source="llava")
    baseline = PhantomForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    twin, info = PhantomForConditionalGeneration.from_pretrained(tmp_path / "out", phantom_dimension=True, output_loading_info=True)
    assert info["missing_keys"] and all("phantom" in key for key in info["missing_keys"]) and not info["unexpected_keys"]
    assert len(info["missing_keys"]) == 2 * (3 * 4 + 2 * 2)  # per layer: 3 MHCA x 4 linears, 2 gates x (weight, bias)
    processor = AutoProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True)
    image = PILImage.new("RGB", (28, 28), (30, 160, 50))
    inputs = processor(images=image, text="<image>\nwhat is it ?", return_tensors="pt")
    with torch.no_grad():
        reference = baseline(**inputs).logits
        logits = twin.eval()(**inputs).logits
    relative = (logits - reference).abs().max() / reference.abs().max()
    assert 0 < relative <= 1e-3

    before = {name: tensor.clone() for name, tensor in twin.state_dict().items()}
    rows = [{"images": [image], "prompt": "<image>\nwhat is it ?", "chosen": "a cat", "rejected": "a dog"}] * 2
    data = Dataset.from_list(rows).cast_column("images", List(Image()))
    args = PhantomPOConfig(
        output_dir=str(tmp_path / "po"), training_stage=1, max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
        bf16=False, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    PhantomPOTrainer(twin.train(), args, train_dataset=data, processing_class=processor).train()
    after = twin.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("phantom" in name or "multi_modal_projector" in name for name in changed)
    assert any("phantom" in name for name in changed) and any("multi_modal_projector" in name for name in changed)
