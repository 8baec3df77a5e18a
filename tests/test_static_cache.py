"""Compiled decoding: `PhantomStaticCache` (generate's `cache_implementation="static"`) gives the default cache's
tokens, and `torch.compile(..., fullgraph=True)` captures the decode step in one graph that gives eager's results.

Compiled runs use dynamo with the "eager" / "aot_eager" backends: they trace the same graph inductor would get
(graph breaks, guards, recompilations, functionalised in-place cache writes) in seconds on a CPU; inductor's own
code generation is exercised by `benchmarks/decode.py` (compiled variants), which checks its tokens against eager.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import CompileConfig, StaticCache

from phantom_hf import PhantomForConditionalGeneration, PhantomStaticCache
from phantom_hf.modeling.compat_phantom import cache_kwargs, cache_of

from .conftest import NEW_TOKENS, image_beam_batch, left_padded_batch, make_model
from .conftest import generate_fixed_length as generate

LENGTHS = [9, 5, 7]


def compile_config(backend: str) -> CompileConfig:
    """transformers' compile path of `generate`, on the CPU too (by default it compiles on accelerators only)."""
    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize(
    "settings,mode",
    [
        (dict(do_sample=False), "expanded"),
        (dict(do_sample=False), "compact"),
        (dict(do_sample=False, num_beams=3, num_return_sequences=2), "expanded"),
        (dict(do_sample=False, num_beams=3, num_return_sequences=2), "compact"),
        (dict(do_sample=True, num_return_sequences=2, top_k=0), "expanded"),
    ],
)
def test_static_cache_generates_the_default_cache_tokens(settings: dict, mode: str) -> None:
    """Padded batch, greedy / beams / sampling, both cache modes: same tokens as the default PhantomCache."""
    model = make_model(seed=11)
    input_ids, attention_mask = left_padded_batch(LENGTHS, seed=30)
    torch.manual_seed(0)
    default = generate(model, input_ids, attention_mask, phantom_cache_mode=mode, **settings)
    torch.manual_seed(0)
    static = generate(
        model, input_ids, attention_mask, phantom_cache_mode=mode, cache_implementation="static",
        return_dict_in_generate=True, **settings,
    )
    assert len({tuple(row[-NEW_TOKENS:].tolist()) for row in default}) > 1  # rows differ: not a trivial pass
    assert torch.equal(static.sequences, default)
    cache = cache_of(static)
    assert isinstance(cache, PhantomStaticCache) and cache.mode == mode
    head_dim = model.config.phantom_head_dim
    assert cache.layers[0].keys.shape[-1] == (2 * head_dim if mode == "expanded" else head_dim)


def test_static_cache_with_images_in_a_beam_batch() -> None:
    model = make_model(seed=3)
    input_ids, attention_mask, settings = image_beam_batch(model)
    default = generate(model, input_ids, attention_mask, **settings)
    static = generate(model, input_ids, attention_mask, cache_implementation="static", **settings)
    assert torch.equal(static, default)


@pytest.mark.parametrize("backbone", ["qwen2", "llama", "mistral", "qwen3", "phi3"])
def test_every_backbone_decodes_static_and_compiled_as_uncached(backbone: str) -> None:
    """Static cache and transformers' compiled decode step for every supported backbone (Mistral with a sliding
    window shorter than the prompts: sliding static layers holding expanded keys)."""
    text = {"model_type": backbone, **({"sliding_window": 5} if backbone == "mistral" else {})}
    model = make_model(seed=5, dtype=torch.float32, text_config=text)
    input_ids, attention_mask = left_padded_batch(LENGTHS, seed=31)
    settings = dict(do_sample=False, new_tokens=4)
    uncached = generate(model, input_ids, attention_mask, use_cache=False, **settings)
    static = generate(model, input_ids, attention_mask, cache_implementation="static", **settings)
    torch._dynamo.reset()
    compiled = generate(
        model, input_ids, attention_mask, cache_implementation="static", compile_config=compile_config("eager"), **settings
    )
    assert torch.equal(static, uncached)
    assert torch.equal(compiled, uncached)


@pytest.mark.parametrize(
    "attn_implementation,mode,phantom_dimension,backend",
    [("sdpa", "expanded", True, "aot_eager"), ("eager", "compact", True, "eager"), ("sdpa", "expanded", False, "eager")],
)
def test_compiled_decode_step_is_one_graph_and_matches_the_uncached_forward(
    attn_implementation: str, mode: str, phantom_dimension: bool, backend: str
) -> None:
    """`torch.compile(model.forward, fullgraph=True)` on decode steps after an eager prefill into a static cache:
    no graph break (fullgraph raises on one), one graph for all steps, the uncached forward's logits."""
    dtype = torch.float32 if attn_implementation == "eager" else torch.float64  # eager attention: see test_modeling
    model = make_model(seed=6, dtype=dtype, phantom_dimension=phantom_dimension)
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask = left_padded_batch([10, 6], seed=32)
    prefill, steps = 6, input_ids.shape[1] - 6
    max_len = input_ids.shape[1] + 2
    if phantom_dimension:
        cache = PhantomStaticCache(model.config.text_config, max_cache_len=max_len, mode=mode)
    else:
        cache = StaticCache(model.config.text_config, max_cache_len=max_len)
    static_mask = torch.zeros(input_ids.shape[0], max_len, dtype=torch.long)  # the same shape at every step
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model.forward, fullgraph=True, backend=counter)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        static_mask[:, :prefill] = attention_mask[:, :prefill]
        logits = [model(input_ids=input_ids[:, :prefill], attention_mask=static_mask[:, :prefill], **cache_kwargs(cache)).logits]
        for position in range(prefill, prefill + steps):
            static_mask[:, position] = attention_mask[:, position]
            logits.append(
                compiled(input_ids=input_ids[:, position : position + 1], attention_mask=static_mask, **cache_kwargs(cache)).logits
            )
    assert counter.frame_count == 1  # one graph, no recompilation from step to step
    real = attention_mask.bool()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(torch.cat(logits, dim=1)[real], full[real], rtol=tolerance, atol=tolerance)


def test_eager_decode_takes_the_compiled_steps_full_length_mask() -> None:
    """The fixed-shape 2D mask of a compiled decode step (one column per static-cache slot) is accepted eagerly too,
    with the uncached forward's logits; any other length is refused, naming both lengths it may have."""
    model = make_model(seed=6)
    input_ids, attention_mask = left_padded_batch([10, 6], seed=32)
    prefill, max_len = 6, input_ids.shape[1] + 2
    cache = PhantomStaticCache(model.config.text_config, max_cache_len=max_len)
    static_mask = torch.zeros(input_ids.shape[0], max_len, dtype=torch.long)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        static_mask[:, :prefill] = attention_mask[:, :prefill]
        logits = [model(input_ids=input_ids[:, :prefill], attention_mask=static_mask[:, :prefill], **cache_kwargs(cache)).logits]
        for position in range(prefill, input_ids.shape[1]):
            static_mask[:, position] = attention_mask[:, position]
            step = input_ids[:, position : position + 1]
            logits.append(model(input_ids=step, attention_mask=static_mask, **cache_kwargs(cache)).logits)
        with pytest.raises(ValueError, match=f"must cover all {input_ids.shape[1] + 1} \\(or the static cache's {max_len} slots\\)"):
            model(input_ids=step, attention_mask=static_mask[:, :-2], **cache_kwargs(cache))
    real = attention_mask.bool()
    torch.testing.assert_close(torch.cat(logits, dim=1)[real], full[real], rtol=1e-10, atol=1e-10)


def test_generate_compiles_the_decode_step_once_and_matches_eager() -> None:
    """transformers' own compile path (`compile_config`, as it runs on a GPU by default): one graph across steps
    and calls, eager's tokens; Phantom models declare it (`_can_compile_fullgraph`)."""
    assert PhantomForConditionalGeneration._can_compile_fullgraph
    model = make_model(seed=8, dtype=torch.float32)
    input_ids, attention_mask = left_padded_batch(LENGTHS, seed=33)
    eager = generate(model, input_ids, attention_mask, do_sample=False)
    torch._dynamo.reset()
    counters.clear()
    settings = dict(do_sample=False, cache_implementation="static", compile_config=compile_config("aot_eager"))
    first = generate(model, input_ids, attention_mask, **settings)
    second = generate(model, input_ids, attention_mask, **settings)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_static_cache_anchors_are_rewritten_in_place_and_never_stale() -> None:
    """A reset cache takes a new batch's anchors (same buffers, new values); beams reorder them in place;
    decoding after a reset equals decoding in a fresh cache."""
    model = make_model(seed=9)
    first_ids, first_mask = left_padded_batch([7, 4], seed=34)
    second_ids, second_mask = left_padded_batch([5, 6], seed=35)
    cache = PhantomStaticCache(model.config.text_config, max_cache_len=12)
    fresh = PhantomStaticCache(model.config.text_config, max_cache_len=12)
    with torch.no_grad():
        model(input_ids=first_ids, attention_mask=first_mask, **cache_kwargs(cache))
        key_buffer, value_buffer = cache.get_anchors(0)
        first_key = key_buffer.clone()
        cache.reorder_cache(torch.tensor([1, 0]))
        assert cache.get_anchors(0)[0] is key_buffer and torch.equal(key_buffer, first_key[[1, 0]])
        cache.reset()
        assert not cache.has_anchors() and cache.get_anchors(0) is None
        reused = model(input_ids=second_ids, attention_mask=second_mask, **cache_kwargs(cache)).logits
        expected = model(input_ids=second_ids, attention_mask=second_mask, **cache_kwargs(fresh)).logits
        assert cache.get_anchors(0)[0] is key_buffer and cache.get_anchors(0)[1] is value_buffer
        torch.testing.assert_close(cache.get_anchors(0)[0], fresh.get_anchors(0)[0], rtol=0, atol=0)
        step_mask = torch.cat([second_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        token = torch.tensor([[17], [23]])
        reused_step = model(input_ids=token, attention_mask=step_mask, **cache_kwargs(cache)).logits
        fresh_step = model(input_ids=token, attention_mask=step_mask, **cache_kwargs(fresh)).logits
    real = second_mask.bool()
    torch.testing.assert_close(reused[real], expected[real], rtol=0, atol=0)
    torch.testing.assert_close(reused_step, fresh_step, rtol=0, atol=0)
    if hasattr(cache.layers[0], "crop"):  # static layers crop on newer releases than transformers 5.11
        cache.crop(-int(cache.get_seq_length()))
        assert not cache.has_anchors()


def test_empty_static_cache_is_converted_and_a_filled_one_refused() -> None:
    model = make_model(seed=10)
    input_ids, attention_mask = left_padded_batch([6, 6], seed=36)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, **cache_kwargs(StaticCache(model.config.text_config, max_cache_len=8)))
        assert isinstance(cache_of(output), PhantomStaticCache) and cache_of(output).has_anchors()
        filled = StaticCache(model.config.text_config, max_cache_len=8)
        filled.update(torch.zeros(2, 2, 6, 16, dtype=torch.float64), torch.zeros(2, 2, 6, 16, dtype=torch.float64), 0)
        with pytest.raises(ValueError, match="StaticCache holding 6 tokens"):
            model(input_ids=input_ids, attention_mask=attention_mask, **cache_kwargs(filled))
    with pytest.raises(ValueError, match="mode must be 'expanded' or 'compact', got 'tiny'"):
        PhantomStaticCache(model.config.text_config, max_cache_len=8, mode="tiny")
