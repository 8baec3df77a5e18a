"""The Xmodel-VLM 1.1B preset (arXiv 2405.09215): dimensions from the public XmodelVLM / XmodelLM code, 144 vision
tokens per image, parameter totals, and the Vicuna v1 conversation format its code trains and infers with."""

from __future__ import annotations

import pytest
import torch

from phantom_hf import PhantomConfig, PhantomForConditionalGeneration
from phantom_hf.modeling.presets_phantom import ALL_PRESET_NAMES
from phantom_hf.modeling.processing_phantom import CHAT_FORMATS, PhantomProcessor, chat_format_for, chat_template_for
from phantom_hf.tokenization import build_tokenizer

NAME = "xmodel-vlm-1.1b"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_v1_prompt(turns: list[tuple[str, str | None]], system: str = SYSTEM) -> str:
    """XmodelVLM's `Conversation.get_prompt` for `conv_templates["v1"]` (SeparatorStyle.TWO, sep " ", sep2 "</s>")."""
    seps = [" ", "</s>"]
    text = system + seps[0]
    for index, (role, message) in enumerate(turns):
        text += f"{role}: {message}{seps[index % 2]}" if message else f"{role}:"
    return text


def test_dimensions_and_token_count() -> None:
    config = PhantomConfig.from_preset(NAME)
    text, vision = config.text_config, config.vision_config
    assert (text.model_type, text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == ("llama", 24, 2048, 32)
    assert (text.num_key_value_heads, text.intermediate_size, text.max_position_embeddings) == (4, 5632, 4096)
    assert text.vocab_size == 32001 and config.image_token_id == 32000  # 32000 + the appended <IMG_CONTEXT>
    assert config.phantom_head_dim == 64 and not config.phantom_dimension
    assert (vision.model_type, vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        "clip_vision_model", 1024, 24, 16,
    )  # fmt: skip
    assert (vision.intermediate_size, vision.patch_size, vision.image_size, vision.hidden_act) == (4096, 14, 336, "quick_gelu")
    assert (config.projector_type, config.projector_group_size, config.vision_feature_layer) == ("xdp", 4, -2)
    assert config.image_seq_length == 144  # (336 / 14)^2 = 576 patches, CLS dropped, 4 per XDP token
    assert NAME in ALL_PRESET_NAMES and chat_format_for(NAME) == "vicuna_v1" == chat_format_for(config)


@pytest.mark.parametrize("phantom_dimension", [False, True])
def test_parameter_totals_on_meta_device(phantom_dimension: bool) -> None:
    config = PhantomConfig.from_preset(NAME, phantom_dimension=phantom_dimension)
    with torch.device("meta"):
        model = PhantomForConditionalGeneration(config)
    params = dict(model.named_parameters())
    count = lambda prefix: sum(p.numel() for n, p in params.items() if n.startswith(prefix))  # noqa: E731
    vision, projector = count("model.vision_tower."), count("model.multi_modal_projector.")
    assert 303e6 <= vision <= 305e6  # CLIP ViT-L/14-336 vision model: 303.5M
    assert projector == (4 * 1024 + 1) * 2048 + (2048 + 1) * 2048  # XDP: Linear(4C, d), Mish, Linear(d, d)
    phantom = sum(p.numel() for n, p in params.items() if "phantom" in n)
    assert phantom == (24 * (3 * 4 * 64**2 + 2 * (64 + 1)) if phantom_dimension else 0)  # 1.18M for the twin
    language = sum(p.numel() for p in params.values()) - vision - projector - phantom
    assert 1.1e9 <= language <= 1.25e9  # Xmodel-LM "1.1B": 1.06B decoder + 2 x 65.5M embedding/head


def test_chat_template_renders_the_published_vicuna_v1_format() -> None:
    tokenizer = build_tokenizer(["what", "is", "it", "?", "a", "cat", "and", "now"], special_tokens=["<unk>", "<|endoftext|>", "</s>", "<IMG_CONTEXT>"], eos_token="</s>")
    config = PhantomConfig.from_preset(NAME, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    processor = PhantomProcessor.from_config(config, tokenizer)
    assert processor.chat_template == CHAT_FORMATS["vicuna_v1"].template == chat_template_for(config)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "and now?"},
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    published = vicuna_v1_prompt([("USER", "<image>\nwhat is it?"), ("ASSISTANT", "a cat"), ("USER", "and now?"), ("ASSISTANT", None)])
    assert rendered == published
    assert rendered.endswith("</s>USER: and now? ASSISTANT:")
    with_system = [{"role": "system", "content": "Be brief."}, *messages[:2]]
    rendered = processor.apply_chat_template(with_system, tokenize=False)
    assert rendered == vicuna_v1_prompt([("USER", "<image>\nwhat is it?"), ("ASSISTANT", "a cat")], system="Be brief.")
    # The assistant mask marks the answer and its </s>: what LLaVA-style SFT trains on.
    encoded = processor.apply_chat_template(
        [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": "a cat"}],
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )  # fmt: skip
    ids, mask = encoded["input_ids"][0], encoded["assistant_masks"][0]
    assert tokenizer.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m]) == ["a", "cat", "</s>"]


def test_unknown_preset_lists_the_baseline() -> None:
    with pytest.raises(ValueError, match="phantom-7b, xmodel-vlm-1.1b"):
        PhantomConfig.from_preset("xmodel-vlm-7b")


def test_baseline_example_smoke() -> None:
    """examples/xmodel_baseline.py at a tiny budget: both models are scored on the same held-out questions, and the
    twin trains exactly the baseline's parameters plus the Phantom modules in both steps."""
    import importlib.util
    from pathlib import Path

    from phantom_hf.synthetic import generate_splits

    path = Path(__file__).resolve().parents[1] / "examples" / "xmodel_baseline.py"
    spec = importlib.util.spec_from_file_location("xmodel_baseline", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.run(steps=(1, 1), num_images=4, num_held_out=3, batch_size=4)
    baseline, twin = results["baseline"], results["+Phantom Dimension"]
    _, held_out = generate_splits(4, 3, seed=0, image_size=example.IMAGE_SIZE, kinds=("color",))
    assert baseline["questions"] == twin["questions"] == [example.question for example in held_out]
    for result in (baseline, twin):
        hits = [answer == example.chosen for answer, example in zip(result["answers"], held_out)]
        assert result["accuracy"] == sum(hits) / 3
    phantom = {name for name in twin["trainable"][2] if "phantom" in name}
    assert len(phantom) == 2 * (3 * 4 + 2 * 2)  # 2 layers: 3 MHCA x 4 linears, 2 gates x (weight, bias)
    assert all(name.startswith("model.multi_modal_projector.") for name in baseline["trainable"][1])
    for stage in (1, 2):
        assert set(twin["trainable"][stage]) - set(baseline["trainable"][stage]) == phantom
        assert set(baseline["trainable"][stage]) <= set(twin["trainable"][stage])
