"""Phantom Dimension against the paper (Sec. 3, Eq. 1-3, and the anchor), from_components, config validation, image placement."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, Qwen2ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from phantom_hf import PhantomConfig, PhantomForConditionalGeneration
from phantom_hf.modeling import modeling_phantom
from phantom_hf.modeling.compat_phantom import cache_of
from phantom_hf.modeling.configuration_phantom import is_phantom_name
from phantom_hf.modeling.modeling_phantom import anchor_positions, sdpa_packed_gqa_decode
from phantom_hf.tiny import tiny_text_config, tiny_vision_config

from .conftest import IMAGE_TOKEN_ID, left_padded_batch, make_model, no_split_modules, randomize_phantom_weights


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def mhca_reference(linears: dict[str, torch.Tensor], x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """The MHCA of Eq. 1 for x (B, N, H, D) and anchor (B, 1, H_a, D)."""
    dim = x.shape[-1]
    qx = F.gelu(x @ linears["linear_q"].T)
    ka = F.gelu(anchor @ linears["linear_k"].T)
    va = F.gelu(anchor @ linears["linear_v"].T)
    scores = torch.softmax(qx @ ka.transpose(-1, -2) / dim**0.5, dim=-1)  # (B, N, H, H_a)
    return F.gelu((scores @ va) @ linears["linear_o"].T)


def phantom_attention_reference(
    attention: torch.nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    anchor_index: torch.Tensor,
    eta: float,
    mixing: str,
    expansion: str,
) -> torch.Tensor:
    """A direct, loop-free re-implementation of Eq. 1-3 for one layer, from the layer's weights."""
    weights = {name: tensor.detach().double() for name, tensor in attention.named_parameters()}
    batch, tokens, _ = hidden.shape
    heads, kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
    dim = attention.head_dim

    def linear(name: str) -> torch.Tensor:
        out = hidden @ weights[f"{name}.weight"].T
        return out + weights[f"{name}.bias"] if f"{name}.bias" in weights else out

    if "qkv_proj.weight" in weights:  # Phi-3 packs q, k, v in one projection
        q, k, v = linear("qkv_proj").split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    else:
        q, k, v = linear("q_proj"), linear("k_proj"), linear("v_proj")
    q, k, v = q.view(batch, tokens, heads, dim), k.view(batch, tokens, kv_heads, dim), v.view(batch, tokens, kv_heads, dim)
    if "q_norm.weight" in weights:  # Qwen3: RMSNorm of each head's q and k before rotary, computed in float32

        def rms_norm(x: torch.Tensor, name: str) -> torch.Tensor:
            eps, x32 = getattr(attention, name).variance_epsilon, x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).double() * weights[f"{name}.weight"]

        q, k = rms_norm(q, "q_norm"), rms_norm(k, "k_norm")
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    rows = torch.arange(batch)
    anchor = {"q": q[rows, anchor_index][:, None], "k": k[rows, anchor_index][:, None], "v": v[rows, anchor_index][:, None]}
    names = {"q": "xattn_query_phantom", "k": "xattn_key_phantom", "v": "xattn_value_phantom"}

    def expand(path: str, x: torch.Tensor) -> torch.Tensor:
        if expansion == "repeat":
            return torch.cat([x, x], dim=-1)
        linears = {n: weights[f"{names[path]}.{n}.weight"] for n in ("linear_q", "linear_k", "linear_v", "linear_o")}
        star = eta * mhca_reference(linears, x, anchor[path])
        return torch.cat([x, x + star if path == "v" else star], dim=-1)

    big_q, big_k, big_v = expand("q", q), expand("k", k), expand("v", v)
    groups = heads // kv_heads
    big_k, big_v = big_k.repeat_interleave(groups, dim=2), big_v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", big_q, big_k) / dim**0.5  # scale 1/sqrt(D), not 1/sqrt(2D)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    output = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), big_v)
    first, second = output[..., :dim], output[..., dim:]
    if mixing == "weighted":
        f = first @ weights["gating_phantom_1.weight"].T + weights["gating_phantom_1.bias"]
        g = second @ weights["gating_phantom_2.weight"].T + weights["gating_phantom_2.bias"]
        w = torch.exp(f) / (torch.exp(f) + torch.exp(g))
        folded = w * first + (1 - w) * second
    elif mixing == "sum":
        folded = first + second
    else:
        folded = (first + second) / 2
    return folded.reshape(batch, tokens, heads * dim) @ weights["o_proj.weight"].T


@pytest.mark.parametrize(
    "attn_implementation,mixing,expansion,backbone",
    [
        ("eager", "weighted", "mhca", "qwen2"),
        ("sdpa", "weighted", "mhca", "qwen2"),
        ("sdpa", "sum", "mhca", "qwen2"),
        ("eager", "mean", "mhca", "qwen2"),
        ("sdpa", "weighted", "repeat", "qwen2"),
        *[(attn, "weighted", "mhca", backbone) for backbone in ("llama", "mistral", "qwen3", "phi3") for attn in ("eager", "sdpa")],
    ],
)
def test_phantom_attention_equals_reference(attn_implementation: str, mixing: str, expansion: str, backbone: str) -> None:
    """Every backbone the config accepts: Qwen2 (q/k/v biases), Llama, Mistral, Qwen3 (q/k norms), Phi-3 (packed qkv)."""
    # transformers' eager attention is NaN on padded rows in float64 (its float32 softmax of a float64 mask
    # minimum), so eager runs in float32
    dtype = torch.float32 if attn_implementation == "eager" else torch.float64
    model = make_model(phantom_mixing=mixing, phantom_expansion=expansion, dtype=dtype, text_config={"model_type": backbone})
    assert model.config.text_config.model_type == backbone
    model.set_attn_implementation(attn_implementation)
    input_ids, attention_mask = left_padded_batch([9, 6, 4], seed=1)
    captured: dict[int, dict] = {}

    def capture(index: int):
        def hook(module, args, kwargs, output):
            captured[index] = {"kwargs": kwargs, "output": output[0]}

        return hook

    layers = model.language_model.layers
    handles = [layer.self_attn.register_forward_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    for handle in handles:
        handle.remove()

    anchor_index = attention_mask.argmax(-1)
    assert anchor_index.tolist() == [0, 3, 5]
    for index, layer in enumerate(layers):
        kwargs = captured[index]["kwargs"]
        cos, sin = kwargs["position_embeddings"]
        expected = phantom_attention_reference(
            layer.self_attn, kwargs["hidden_states"].double(), cos.double(), sin.double(), attention_mask,
            anchor_index, 1.0, mixing, expansion,
        )
        real = attention_mask.bool()
        tolerance = 1e-5 if dtype == torch.float32 else 1e-10
        output = captured[index]["output"].double()
        torch.testing.assert_close(output[real], expected[real], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("tokens", [1, 5])
def test_fused_expansion_equals_the_cross_attention_modules(tokens: int) -> None:
    """What runs (the three MHCAs of a layer fused, anchor operands precomputed once) equals
    `PhantomCrossAttention.forward`, the paper's form (Eq. 1), path by path; also the compact cache's "kv" and
    "q" calls, with the config's eta read at call time."""
    model = make_model(seed=3)
    model.config.phantom_eta = 0.7
    layer = model.language_model.layers[1].self_attn
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = layer.phantom_num_heads, layer.phantom_num_kv_heads, layer.head_dim
    states = {
        path: torch.randn(2, n, tokens, dim, generator=generator, dtype=torch.float64)
        for path, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))
    }
    anchor_index = torch.tensor([0, tokens - 1])
    rows = torch.arange(2)
    expected = {}
    for path, name in (("q", "xattn_query_phantom"), ("k", "xattn_key_phantom"), ("v", "xattn_value_phantom")):
        x = states[path]
        star = 0.7 * getattr(layer, name)(x, x[rows, :, anchor_index])
        expected[path] = torch.cat([x, x + star if path == "v" else star], dim=-1)
    with torch.no_grad():
        anchors = layer._phantom_anchors(states["q"], states["k"], states["v"], anchor_index)
        # all the cache keeps: the keys in their path's third of a 3*D row, the values
        assert [tensor.shape for tensor in anchors] == [(2, heads + 2 * kv_heads, 3 * dim), (2, heads + 2 * kv_heads, dim)]
        derived = layer._phantom_derived_weights()
        fused = dict(zip("qkv", layer._phantom_expand("qkv", (states["q"], states["k"], states["v"]), anchors, derived)))
        fused.update(zip("kv", layer._phantom_expand("kv", (states["k"], states["v"]), anchors, derived)))
        compact_q = layer._phantom_expand("q", (states["q"],), anchors, derived)[0]
    for path in "qkv":
        torch.testing.assert_close(fused[path], expected[path], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compact_q, expected["q"], rtol=1e-12, atol=1e-12)


def test_derived_weights_follow_every_change_of_the_phantom_parameters() -> None:
    """The stacked MHCA query weights and the fold's gate, kept between inference calls, are rebuilt when a Phantom
    parameter changes in place (an optimizer step, load_state_dict; or through `.data`, as PEFT's merge and weight
    syncs write, which leaves the tensor's version counter as it was) or is replaced: the outputs equal a fresh model's
    with the new parameters, under no_grad and with autograd recording alike."""
    model, fresh = make_model(seed=4), make_model(seed=4)
    input_ids, attention_mask = left_padded_batch([7, 5], seed=4)
    real = attention_mask.bool()

    def logits(m, grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return m(input_ids=input_ids, attention_mask=attention_mask).logits[real].detach()

    before = logits(model)
    layer, fresh_layer = model.language_model.layers[0].self_attn, fresh.language_model.layers[0].self_attn
    changes = [
        lambda a: a.xattn_key_phantom.linear_q.weight.mul_(-1.5),  # in place
        lambda a: a.gating_phantom_2.bias.add_(3.0),
        lambda a: a.gating_phantom_1.weight.mul_(2.0),
        lambda a: setattr(a.xattn_value_phantom.linear_q, "weight", torch.nn.Parameter(a.xattn_value_phantom.linear_q.weight * 0.5)),
        lambda a: a.xattn_query_phantom.linear_q.weight.data.add_(0.25),  # through .data: no version bump
        lambda a: a.gating_phantom_1.bias.data.copy_(a.gating_phantom_1.bias.data - 2.0),
    ]
    for change in changes:
        with torch.no_grad():
            change(layer)
            change(fresh_layer)
        expected = logits(fresh, grad=True)
        torch.testing.assert_close(logits(model), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logits(model, grad=True), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(logits(model), before)


@pytest.mark.parametrize("forget", ["reset", "crop"])
@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
def test_a_cache_keeps_the_derived_weights_of_its_prefill_and_forgets_them_with_its_anchors(forget: str, cache_class: str) -> None:
    """At inference a Phantom cache keeps, with the anchors, the weights derived from the Phantom parameters at
    prefill (decode steps do not check the parameters again); emptied (reset, crop to nothing) it forgets both, so
    a cache reused after the parameters changed gives what a fresh model with the new parameters gives."""
    from transformers.cache_utils import StaticLayer

    from phantom_hf import PhantomCache, PhantomStaticCache

    if cache_class == "static" and forget == "crop" and not hasattr(StaticLayer, "crop"):
        pytest.skip("this transformers' StaticCache cannot crop (its StaticLayer has no crop; 5.11 has none)")
    model, fresh = make_model(seed=6), make_model(seed=6)
    input_ids, attention_mask = left_padded_batch([6, 6], seed=6)

    def new_cache(m):
        if cache_class == "dynamic":
            return PhantomCache()
        return PhantomStaticCache(m.config.text_config, max_cache_len=input_ids.shape[1] + 2)

    def prefill_and_step(m, cache) -> torch.Tensor:
        with torch.no_grad():
            out = m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            step = m(input_ids=token, attention_mask=mask, past_key_values=cache_of(out), use_cache=True)
        return torch.cat([out.logits[:, -1], step.logits[:, -1]])

    cache = new_cache(model)
    before = prefill_and_step(model, cache)
    assert set(cache.derived_weights) == set(range(model.config.text_config.num_hidden_layers))
    for m in (model, fresh):
        with torch.no_grad():
            for layer in m.language_model.layers:
                layer.self_attn.gating_phantom_1.weight.mul_(-2.0)
                layer.self_attn.xattn_value_phantom.linear_q.weight.mul_(0.5)
    cache.reset() if forget == "reset" else cache.crop(-int(cache.get_seq_length()))  # every token
    assert cache.derived_weights == {}
    after = prefill_and_step(model, cache)
    torch.testing.assert_close(after, prefill_and_step(fresh, new_cache(fresh)), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 18, 192), (2, 18, 1, 64), (3, 1, 64), (128, 192), (64,)])
def test_gelu_small_is_the_exact_gelu(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """`gelu_small` (ATen's kernel through a transposed view below oneDNN's size, `F.gelu` above) is
    x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)) to the dtype's rounding, with x's shape and a contiguous result."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3).to(dtype)
    reference = x.double() * 0.5 * (1 + torch.erf(x.double() / 2**0.5))
    result = modeling_phantom.gelu_small(x)
    assert result.shape == x.shape and result.dtype == dtype and result.is_contiguous()
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-14}[dtype]
    torch.testing.assert_close(result.double(), reference, rtol=tolerance, atol=tolerance)


def test_phantom_eta_is_read_from_the_model_config() -> None:
    """Changing `model.config.phantom_eta` after building changes the model as building it with that eta does."""
    model = make_model(seed=2, phantom_eta=1.0)
    input_ids, attention_mask = left_padded_batch([7, 5], seed=2)
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits
        model.config.phantom_eta = 0.25
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
        built = make_model(seed=2, phantom_eta=0.25)(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert not torch.allclose(after[real], before[real])
    torch.testing.assert_close(after[real], built[real], rtol=1e-12, atol=1e-12)


def test_sdpa_and_eager_agree_on_padded_batch() -> None:
    model = make_model(dtype=torch.float32)  # eager is NaN on padded rows in float64 (see above)
    input_ids, attention_mask = left_padded_batch([8, 5], seed=2)
    with torch.no_grad():
        sdpa = model(input_ids=input_ids, attention_mask=attention_mask).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(sdpa[real], eager[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", ["none", "bool", "float", "per-head"])
def test_packed_decode_attention_equals_transformers_sdpa(mask: str) -> None:
    """The packed-GQA decode attention gives what transformers' sdpa gives (enable_gqa without a mask, its
    own GQA handling with one), with value head size 2 x head_dim as Phantom's, in float64."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, tokens, dim = 2, 6, 2, 9, 8
    query = torch.randn(batch, heads, 1, 2 * dim, generator=generator, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, tokens, 2 * dim, generator=generator, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, tokens, 2 * dim, generator=generator, dtype=torch.float64)
    attended = torch.rand(batch, heads if mask == "per-head" else 1, 1, tokens, generator=generator) > 0.3
    attended[..., -1] = True
    attention_mask = {
        "none": None,
        "bool": attended,
        "per-head": attended,
        "float": torch.zeros(attended.shape, dtype=torch.float64).masked_fill(~attended, float("-inf")),
    }[mask]
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    module.is_causal = True
    packed, _ = sdpa_packed_gqa_decode(module, query, key, value, attention_mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=0.25)
    assert packed.shape == expected.shape == (batch, 1, heads, 2 * dim)
    torch.testing.assert_close(packed, expected, rtol=1e-12, atol=1e-12)


def test_cpu_sdpa_decode_steps_run_packed_and_match_the_uncached_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(seed=7)
    input_ids, attention_mask = left_padded_batch([9, 6], seed=3)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return sdpa_packed_gqa_decode(*args, **kwargs)

    monkeypatch.setattr(modeling_phantom, "sdpa_packed_gqa_decode", counting)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        assert not calls  # several query tokens: transformers' sdpa
        cache = cache_of(model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1]))
        step = model(input_ids=input_ids[:, -1:], attention_mask=attention_mask, cache=cache).logits
    assert len(calls) == model.config.text_config.num_hidden_layers
    torch.testing.assert_close(step[:, 0], full[:, -1], rtol=1e-10, atol=1e-10)


def test_from_components_reproduces_the_llm() -> None:
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(tiny_text_config()).to(torch.float64).eval()
    input_ids, attention_mask = left_padded_batch([10, 7], seed=3)
    with torch.no_grad():
        reference = llm(input_ids=input_ids, attention_mask=attention_mask).logits
    baseline = PhantomForConditionalGeneration.from_components(
        llm, vision_config=tiny_vision_config(), image_token_id=IMAGE_TOKEN_ID, phantom_dimension=False
    ).eval()
    with torch.no_grad():
        plain = baseline(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert torch.equal(plain[real], reference[real])

    phantom = PhantomForConditionalGeneration.from_components(
        llm, vision_config=tiny_vision_config(), image_token_id=IMAGE_TOKEN_ID
    ).eval()
    assert phantom.language_model is llm.model and phantom.lm_head is llm.lm_head  # weights reused, not copied
    phantom_params = {n: p for n, p in phantom.named_parameters() if "phantom" in n}
    head_dim, layers = 16, 2
    assert sum(p.numel() for p in phantom_params.values()) == layers * (3 * 4 * head_dim**2 + 2 * (head_dim + 1))
    assert all(p.dtype == torch.float64 for p in phantom_params.values())
    with torch.no_grad():
        logits = phantom(input_ids=input_ids, attention_mask=attention_mask).logits
    relative = (logits[real] - reference[real]).abs().max() / reference[real].abs().max()
    assert 0 < relative <= 1e-3  # eta = 1e-4: a no-op to ~1e-4, but not skipped


def test_from_components_warns_when_it_builds_a_random_vision_tower() -> None:
    llm = Qwen2ForCausalLM(tiny_text_config())
    tower = r"vision tower \(InternVLVisionModel, [\d,]+ parameters\) has random weights"
    with pytest.warns(UserWarning, match=tower):
        random_tower = PhantomForConditionalGeneration.from_components(
            llm, vision_config=tiny_vision_config(), image_token_id=IMAGE_TOKEN_ID, phantom_dimension=False
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = PhantomForConditionalGeneration.from_components(
            llm, vision_model=random_tower.model.vision_tower, image_token_id=IMAGE_TOKEN_ID, phantom_dimension=False
        )
    assert given.model.vision_tower is random_tower.model.vision_tower


def test_every_phantom_parameter_name_says_phantom(model: PhantomForConditionalGeneration) -> None:
    names = [n for n, _ in model.named_parameters()]
    new = {n for n in names if "phantom" in n}
    layer0 = "model.language_model.layers.0.self_attn."
    for expected in (
        "xattn_query_phantom.linear_q.weight",
        "xattn_key_phantom.linear_o.weight",
        "xattn_value_phantom.linear_v.weight",
        "gating_phantom_1.weight",
        "gating_phantom_2.bias",
    ):
        assert layer0 + expected in new
    backbone = PhantomForConditionalGeneration(PhantomConfig(**{**model.config.to_dict(), "phantom_dimension": False}))
    assert set(names) - new == {n for n, _ in backbone.named_parameters()}
    assert new == {n for n in names if is_phantom_name(n)}  # the table of Phantom module names finds the same ones


def test_model_pickles_through_its_phantom_attention_classes(model: PhantomForConditionalGeneration) -> None:
    """The attention classes made at run time (`phantom_attention_class`) are found by name when unpickling."""
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy.model.language_model.layers[0].self_attn) is type(model.model.language_model.layers[0].self_attn)
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, model(ids).logits)


def test_images_are_placed_at_placeholders_and_counts_checked(model: PhantomForConditionalGeneration) -> None:
    per_tile = model.config.image_seq_length
    assert per_tile == 4  # 28 px tiles of 7 px patches: 16 patches, pixel shuffle 0.5 -> 4
    pixel_values = torch.randn(3, 3, 28, 28, dtype=torch.float64)
    input_ids = torch.randint(10, 128, (2, 20))
    input_ids[0, 2 : 2 + 2 * per_tile] = IMAGE_TOKEN_ID  # row 0: two tiles
    input_ids[1, 5 : 5 + per_tile] = IMAGE_TOKEN_ID  # row 1: one tile
    with torch.no_grad():
        output = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False)
        features = model.get_image_features(pixel_values)
        embeds = model.get_input_embeddings()(input_ids)
        embeds[input_ids == IMAGE_TOKEN_ID] = features.reshape(-1, features.shape[-1])
        by_embeds = model(inputs_embeds=embeds, use_cache=False)
    torch.testing.assert_close(output.logits, by_embeds.logits)
    torch.testing.assert_close(output.image_hidden_states, features)

    with pytest.raises(ValueError, match=r"12 image placeholder tokens .* 2 tiles x 4 = 8 vision tokens"):
        model(input_ids=input_ids, pixel_values=pixel_values[:2])
    with pytest.raises(ValueError, match="12 image placeholder tokens but no pixel_values"):
        model(input_ids=input_ids)
    with pytest.raises(TypeError, match="floating-point"):
        model(input_ids=input_ids, pixel_values=pixel_values.long())


def test_rows_share_encoded_tiles_through_image_tile_index(model: PhantomForConditionalGeneration) -> None:
    """A preference batch (chosen rows, then rejected rows on the same images) passes its tiles once; the vision
    tower runs once on them and the logits equal those of passing every tile twice."""
    per_tile = model.config.image_seq_length
    pixel_values = torch.randn(3, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    input_ids = torch.randint(10, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    input_ids[0, 2 : 2 + 2 * per_tile] = IMAGE_TOKEN_ID  # row 0: two tiles
    input_ids[1, 5 : 5 + per_tile] = IMAGE_TOKEN_ID  # row 1: one tile
    pairs = torch.cat([input_ids, input_ids])
    encoded = []
    model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: encoded.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    index = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        shared = model(input_ids=pairs, pixel_values=pixel_values, image_tile_index=torch.arange(3).repeat(2), use_cache=False)
        naive = model(input_ids=pairs, pixel_values=torch.cat([pixel_values, pixel_values]), use_cache=False)
        permuted = model(input_ids=pairs, pixel_values=pixel_values, image_tile_index=index, use_cache=False)
        naive_permuted = model(input_ids=pairs, pixel_values=pixel_values[index], use_cache=False)
    assert encoded == [3, 6, 3, 6]
    torch.testing.assert_close(shared.logits, naive.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(permuted.logits, naive_permuted.logits, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(permuted.logits[2:], shared.logits[2:])  # the index decides which tile goes where

    with pytest.raises(ValueError, match=r"tiles outside \[0, 3\)"):
        model(input_ids=pairs, pixel_values=pixel_values, image_tile_index=torch.tensor([0, 1, 2, 3, 1, 0]))
    with pytest.raises(TypeError, match="image_tile_index must be an int64 tensor"):
        model(input_ids=pairs, pixel_values=pixel_values, image_tile_index=index.float())
    with pytest.raises(ValueError, match="neither was given"):
        model(input_ids=input_ids, image_tile_index=index)
    with pytest.raises(ValueError, match=r"24 image placeholder tokens .* 3 tiles x 4 = 12 vision tokens"):
        model(input_ids=pairs, pixel_values=pixel_values, image_tile_index=torch.arange(3))


def test_vision_side_matches_spec() -> None:
    """InternViT last hidden state, CLS dropped, pixel shuffle 0.5, LayerNorm-Linear-GELU-Linear."""
    model = make_model()
    pixel_values = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # (2, 16, 32)
        grid = hidden.reshape(2, 4, 4, 32)
        # pixel shuffle 0.5: each output token concatenates a 2x2 block (InternVL's channel order)
        shuffled = grid.reshape(2, 4, 2, 64).permute(0, 2, 1, 3).reshape(2, 2, 2, 128).permute(0, 2, 1, 3)
        projector = model.multi_modal_projector
        x = F.layer_norm(shuffled.reshape(2, 4, 128), (128,), projector.layer_norm.weight, projector.layer_norm.bias)
        expected = projector.linear_2(F.gelu(projector.linear_1(x)))
        torch.testing.assert_close(model.get_image_features(pixel_values), expected)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("phantom_mixing", "max", "phantom_mixing"),
        ("phantom_eta", 0.0, "phantom_eta"),
        ("phantom_eta", -1.0, "phantom_eta"),
        ("phantom_expansion", "copy", "phantom_expansion"),
        ("phantom_cache_mode", "paged", "phantom_cache_mode"),
        ("projector_type", "qformer", "projector_type"),
    ],
)
def test_invalid_config_values_name_the_field(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PhantomConfig(text_config=tiny_text_config(), vision_config=tiny_vision_config(), **{field: value})


def test_unwrappable_backbone_and_flash_head_size_are_refused() -> None:
    with pytest.raises(ValueError, match="text_config.model_type 'gpt2'"):
        PhantomConfig(text_config=GPT2Config(), vision_config=tiny_vision_config())
    PhantomConfig(text_config=GPT2Config(), vision_config=tiny_vision_config(), phantom_dimension=False)
    wide = tiny_text_config(hidden_size=320, num_attention_heads=2, num_key_value_heads=1)  # head_dim 160
    config = PhantomConfig(text_config=wide, vision_config=tiny_vision_config())
    with pytest.raises(ValueError, match=r"2\*head_dim = 320 > 256"):
        config.validate_attn_implementation("flash_attention_2")
    config.validate_attn_implementation("sdpa")


def test_anchor_token_id_selects_first_occurrence_and_missing_is_an_error() -> None:
    anchor_id = 7
    model = make_model(phantom_anchor_token_id=anchor_id)
    input_ids, attention_mask = left_padded_batch([8, 6], seed=4)
    input_ids[0, 3] = anchor_id
    input_ids[0, 5] = anchor_id
    input_ids[1, 4] = anchor_id
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    anchor_keys, _ = cache_of(output).get_anchors(0)
    layer = model.language_model.layers[0].self_attn
    # the cached anchor keys of the key path are gelu(Lk(k_a)) of the keys (after rotary) at positions 3 and 4
    with torch.no_grad():
        hidden = model.language_model.layers[0].input_layernorm(model.get_input_embeddings()(input_ids))
        _, keys, _ = layer._phantom_project(hidden)
        cos, sin = model.language_model.rotary_emb(hidden, torch.arange(8)[None].expand(2, -1))  # forward's default
        _, keys = layer._phantom_rotary(keys, keys, cos, sin)
        expected, _ = layer.xattn_key_phantom.anchor_states(torch.stack([keys[0, :, 3], keys[1, :, 4]]))
    heads, kv_heads = layer.phantom_num_heads, layer.phantom_num_kv_heads
    dim = layer.head_dim  # the key path's anchor keys sit in the middle third of their 3*D rows
    torch.testing.assert_close(anchor_keys[:, heads : heads + kv_heads, dim : 2 * dim], expected)

    input_ids[1, 4] = 11
    with pytest.raises(ValueError, match=r"phantom_anchor_token_id=7 does not occur in rows \[1\]"):
        model(input_ids=input_ids, attention_mask=attention_mask)


def test_anchor_positions_from_a_prepared_4d_mask_equal_the_2d_masks() -> None:
    """`generate` with a static cache passes a prepared 4D mask (boolean for sdpa, additive for eager, a dict per
    layer type with sliding windows); the anchors found from it are the 2D mask's."""
    _, attention_mask = left_padded_batch([6, 3, 5], seed=7)
    expected = anchor_positions(None, attention_mask, None, 3, torch.device("cpu"))
    assert expected.tolist() == [0, 3, 1]
    causal = torch.ones(6, 9, dtype=torch.bool).tril()  # 6 queries over a static cache of 9 slots
    allowed = causal[None, None] & torch.nn.functional.pad(attention_mask.bool(), (0, 3))[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for mask in (allowed, additive, {"full_attention": allowed, "sliding_attention": allowed}):
        assert torch.equal(anchor_positions(None, mask, None, 3, torch.device("cpu")), expected)
    input_ids = torch.full((3, 6), 11)
    input_ids[:, 4] = 7
    input_ids[0, 2] = 7
    assert anchor_positions(input_ids, additive, 7, 3, torch.device("cpu")).tolist() == [2, 4, 4]


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = make_model()
    model.train()
    input_ids, attention_mask = left_padded_batch([7, 7], seed=5)
    labels = input_ids.clone()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    # transformers 5.23 renamed gradient_checkpointing_enable (deprecated since) to activation_checkpointing_enable
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert model.language_model.gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and any("phantom" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-10, atol=1e-12)


def test_resize_token_embeddings_keeps_old_logits(model: PhantomForConditionalGeneration) -> None:
    input_ids, attention_mask = left_padded_batch([6, 4], seed=6)
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits
    model.resize_token_embeddings(131)
    assert model.config.text_config.vocab_size == 131
    assert model.lm_head.weight.shape[0] == 131
    with torch.no_grad():
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(after[real][:, :128], before[real])


def test_no_split_modules_name_the_decoder_and_vision_layers(model: PhantomForConditionalGeneration) -> None:
    assert {"Qwen2DecoderLayer", "InternVLVisionLayer"} <= no_split_modules(model)
    randomize_phantom_weights(model)  # Phantom modules live inside the decoder layer: never split from it
    attention_class = type(model.language_model.layers[0].self_attn)
    assert attention_class.__name__ == "PhantomQwen2Attention"


def test_input_require_grads_hooks_the_llm_embeddings_only(model: PhantomForConditionalGeneration) -> None:
    """A frozen vision tower must not run a backward (training stage 1 with checkpointing on)."""
    model.requires_grad_(False)
    model.enable_input_require_grads()
    pixel_values = torch.randn(1, 3, 28, 28, dtype=torch.float64)
    input_ids = torch.tensor([[11, 12, 13]])
    assert not model.vision_tower(pixel_values=pixel_values).last_hidden_state.requires_grad
    assert model.get_input_embeddings()(input_ids).requires_grad
    model.disable_input_require_grads()
    assert not model.get_input_embeddings()(input_ids).requires_grad
