"""Conversion of published Phantom checkpoints (the published layout, docs/design.md section 5).

Random tiny checkpoints are written in the PUBLISHED layout, converted, reloaded through the Auto classes, and
their logits compared with a computation of the published model written here from the paper's equations: InternViT from its
packed `attn.qkv`, InternLM2 attention from its packed `wqkv`, Phi-3 from `qkv_proj` / `gate_up_proj`, and
Phantom attention (paper Eq. 1-3) loop-free, with eta = 1 so that the Phantom path carries weight.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast

from phantom_hf.convert import add_convert_arguments, convert_checkpoint, run_convert
from phantom_hf.modeling.compat_phantom import cache_kwargs, cache_of

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 96, 64, 96, 2, 4, 2, 16
VIT_HIDDEN, VIT_HEADS, VIT_INTER, VIT_LAYERS, PATCH, IMAGE = 32, 2, 64, 2, 7, 28
IMG_START, IMG_END, IMG_CONTEXT = 90, 91, 92  # ids in the published tokenizer
TOKENS_PER_TILE = (IMAGE // PATCH) ** 2 // 4
LLM = {
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "use_sliding_window": False},
    "internlm2": {"architectures": ["InternLM2ForCausalLM"], "rms_norm_eps": 1e-5, "rope_theta": 1e6, "bias": False,
                  "rope_scaling": None, "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
             "original_max_position_embeddings": 256, "sliding_window": 2047, "bos_token_id": 1, "eos_token_id": 2,
             "pad_token_id": 0},
}  # fmt: skip
ATTENTION = {"qwen2": "self_attn", "internlm2": "attention", "phi3": "self_attn"}
PHANTOM_MODULES = ("xattn_query_phantom", "xattn_key_phantom", "xattn_value_phantom")


# ---------------------------------------------------------------------------------------------------
# Published checkpoints
# ---------------------------------------------------------------------------------------------------


def published_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the published names and shapes (docs/design.md, section 5)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm(size: int) -> torch.Tensor:
        return 1 + r(size)

    n_patches, c = (IMAGE // PATCH) ** 2, VIT_HIDDEN
    sd = {
        "vision_model.embeddings.class_embedding": r(1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": r(c, 3, PATCH, PATCH),
        "vision_model.embeddings.patch_embedding.bias": r(c),
        "vision_model.embeddings.position_embedding": r(1, n_patches + 1, c),
    }
    for i in range(VIT_LAYERS):
        p = f"vision_model.encoder.layers.{i}."
        sd |= {
            p + "attn.qkv.weight": r(3 * c, c, scale=0.3), p + "attn.qkv.bias": r(3 * c),
            p + "attn.proj.weight": r(c, c, scale=0.3), p + "attn.proj.bias": r(c),
            p + "mlp.fc1.weight": r(VIT_INTER, c, scale=0.3), p + "mlp.fc1.bias": r(VIT_INTER),
            p + "mlp.fc2.weight": r(c, VIT_INTER, scale=0.3), p + "mlp.fc2.bias": r(c),
            p + "norm1.weight": norm(c), p + "norm1.bias": r(c), p + "norm2.weight": norm(c), p + "norm2.bias": r(c),
            p + "ls1": r(c, scale=0.5), p + "ls2": r(c, scale=0.5),
        }  # fmt: skip
    sd |= {
        "vision_proj.0.weight": norm(4 * c), "vision_proj.0.bias": r(4 * c),
        "vision_proj.1.weight": r(HIDDEN, 4 * c, scale=0.2), "vision_proj.1.bias": r(HIDDEN),
        "vision_proj.3.weight": r(HIDDEN, HIDDEN, scale=0.2), "vision_proj.3.bias": r(HIDDEN),
    }  # fmt: skip
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    lm = "language_model.model."
    sd[lm + ("tok_embeddings" if arch == "internlm2" else "embed_tokens") + ".weight"] = r(VOCAB, HIDDEN, scale=1.0)
    for i in range(LAYERS):
        p = f"{lm}layers.{i}."
        a = p + ATTENTION[arch] + "."
        if arch == "qwen2":
            sd |= {
                a + "q_proj.weight": r(q_size, HIDDEN, scale=0.2), a + "q_proj.bias": r(q_size),
                a + "k_proj.weight": r(kv_size, HIDDEN, scale=0.2), a + "k_proj.bias": r(kv_size),
                a + "v_proj.weight": r(kv_size, HIDDEN, scale=0.2), a + "v_proj.bias": r(kv_size),
                a + "o_proj.weight": r(HIDDEN, q_size, scale=0.2),
                p + "mlp.gate_proj.weight": r(INTER, HIDDEN, scale=0.2), p + "mlp.up_proj.weight": r(INTER, HIDDEN, scale=0.2),
                p + "mlp.down_proj.weight": r(HIDDEN, INTER, scale=0.2),
                p + "input_layernorm.weight": norm(HIDDEN), p + "post_attention_layernorm.weight": norm(HIDDEN),
            }  # fmt: skip
        elif arch == "internlm2":
            sd |= {
                a + "wqkv.weight": r(q_size + 2 * kv_size, HIDDEN, scale=0.2), a + "wo.weight": r(HIDDEN, q_size, scale=0.2),
                p + "feed_forward.w1.weight": r(INTER, HIDDEN, scale=0.2), p + "feed_forward.w3.weight": r(INTER, HIDDEN, scale=0.2),
                p + "feed_forward.w2.weight": r(HIDDEN, INTER, scale=0.2),
                p + "attention_norm.weight": norm(HIDDEN), p + "ffn_norm.weight": norm(HIDDEN),
            }  # fmt: skip
        else:
            sd |= {
                a + "qkv_proj.weight": r(q_size + 2 * kv_size, HIDDEN, scale=0.2), a + "o_proj.weight": r(HIDDEN, q_size, scale=0.2),
                p + "mlp.gate_up_proj.weight": r(2 * INTER, HIDDEN, scale=0.2), p + "mlp.down_proj.weight": r(HIDDEN, INTER, scale=0.2),
                p + "input_layernorm.weight": norm(HIDDEN), p + "post_attention_layernorm.weight": norm(HIDDEN),
            }  # fmt: skip
        for module in PHANTOM_MODULES:
            for linear in ("linear_q", "linear_k", "linear_v", "linear_o"):
                sd[f"{a}{module}.{linear}.weight"] = r(HEAD_DIM, HEAD_DIM, scale=0.5)
        for gate in ("gating_phantom_1", "gating_phantom_2"):
            sd[f"{a}{gate}.weight"], sd[f"{a}{gate}.bias"] = r(1, HEAD_DIM, scale=0.5), r(1, scale=0.5)
    sd[lm + "norm.weight"] = norm(HIDDEN)
    sd["language_model." + ("output" if arch == "internlm2" else "lm_head") + ".weight"] = r(VOCAB, HIDDEN, scale=0.2)
    return sd


def published_config(arch: str) -> dict:
    llm = {
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "silu",
        "max_position_embeddings": 256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "attn_implementation": "flash_attention_2", **LLM[arch],
    }  # fmt: skip
    vision = {
        "hidden_size": VIT_HIDDEN, "intermediate_size": VIT_INTER, "num_hidden_layers": VIT_LAYERS,
        "num_attention_heads": VIT_HEADS, "image_size": IMAGE, "patch_size": PATCH, "qkv_bias": True,
        "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
        "drop_path_rate": 0.1, "use_flash_attn": True, "architectures": ["InternVisionModel"],
    }  # fmt: skip
    return {"model_type": "phantom", "llm_config": llm, "vision_config": vision, "downsample_ratio": 0.5,
            "image_token_index": IMG_CONTEXT, "template": "phantom"}  # fmt: skip


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer of 90 tokens without the image tokens (the converter adds them at 90, 91, 92)."""
    vocab = {f"w{i}": i for i in range(90)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", eos_token="w2").save_pretrained(folder)


def write_published(folder: Path, arch: str, state: dict[str, torch.Tensor], layout: str, config: bool = True) -> Path:
    """Write `state` as a published folder: one safetensors file, sharded safetensors, or (sharded) .bin."""
    folder.mkdir(parents=True, exist_ok=True)
    if config:
        (folder / "config.json").write_text(json.dumps(published_config(arch)))
    names = list(state)
    if layout == "safetensors":
        save_file(state, folder / "model.safetensors")
    elif layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        extension = "safetensors" if layout == "sharded-safetensors" else "bin"
        prefix = "model" if extension == "safetensors" else "pytorch_model"
        weight_map = {}
        for i, part in enumerate(halves):
            file_name = f"{prefix}-{i + 1:05d}-of-00002.{extension}"
            shard = {name: state[name].clone() for name in part}
            save_file(shard, folder / file_name) if extension == "safetensors" else torch.save(shard, folder / file_name)
            weight_map |= dict.fromkeys(part, file_name)
        (folder / f"{prefix}.{extension}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


# ---------------------------------------------------------------------------------------------------
# The published model, computed from the paper's equations
# ---------------------------------------------------------------------------------------------------


def reference_vision(sd: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
    """InternViT (last hidden state, CLS dropped) -> pixel shuffle 0.5 -> LayerNorm, Linear, GELU, Linear."""
    c, d = VIT_HIDDEN, VIT_HIDDEN // VIT_HEADS
    e = "vision_model.embeddings."
    x = F.conv2d(pixel_values, sd[e + "patch_embedding.weight"], sd[e + "patch_embedding.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[e + "class_embedding"].expand(x.shape[0], -1, -1), x], dim=1) + sd[e + "position_embedding"]
    b, n, _ = x.shape
    for i in range(VIT_LAYERS):
        p = f"vision_model.encoder.layers.{i}."
        h = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, VIT_HEADS, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + sd[p + "ls1"] * F.linear(attn, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        mlp = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "ls2"] * mlp
    x = x[:, 1:]
    side = int(round(x.shape[1] ** 0.5))
    x = x.reshape(b, side, side, c)  # pixel shuffle 0.5, as InternVL writes it
    x = x.view(b, side, side // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(b, side // 2, side // 2, c * 4).permute(0, 2, 1, 3).contiguous().reshape(b, -1, 4 * c)
    x = F.layer_norm(x, (4 * c,), sd["vision_proj.0.weight"], sd["vision_proj.0.bias"], eps=1e-5)
    x = F.gelu(F.linear(x, sd["vision_proj.1.weight"], sd["vision_proj.1.bias"]))
    return F.linear(x, sd["vision_proj.3.weight"], sd["vision_proj.3.bias"])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding at positions 0..N-1 on (B, H, N, D), rotate-half convention."""
    n = x.shape[2]
    inv_freq = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    half = torch.cat([-x[..., HEAD_DIM // 2 :], x[..., : HEAD_DIM // 2]], dim=-1)
    return x * cos + half * sin


def mhca(sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """The MHCA of Eq. 1: x (B, H, N, D) attends over the anchor's heads, anchor (B, H_a, D)."""
    lq, lk, lv, lo = (sd[f"{prefix}.linear_{p}.weight"] for p in "qkvo")
    qx, ka, va = F.gelu(x @ lq.T), F.gelu(anchor @ lk.T), F.gelu(anchor @ lv.T)
    s = torch.softmax(torch.einsum("bhnd,bad->bhna", qx, ka) / HEAD_DIM**0.5, dim=-1)
    return F.gelu(torch.einsum("bhna,bad->bhnd", s, va) @ lo.T)


def phantom_attention(sd, a, q, k, v, eta, window=None):
    """Eq. 1-3 on rotary-applied q (B, H_q, N, D), k, v (B, H_kv, N, D); anchor = position 0.

    `window`: the published Phi-3 sliding window (model/arch_3_8b/modeling_phi3.py, flash-attention
    `window_size=(window, window)` with `causal=True`): query i sees keys i - window ... i, window + 1 of them."""
    q_star = eta * mhca(sd, a + "xattn_query_phantom", q, q[:, :, 0])
    k_star = eta * mhca(sd, a + "xattn_key_phantom", k, k[:, :, 0])
    v_star = v + eta * mhca(sd, a + "xattn_value_phantom", v, v[:, :, 0])
    big_q, big_k, big_v = torch.cat([q, q_star], -1), torch.cat([k, k_star], -1), torch.cat([v, v_star], -1)
    big_k, big_v = big_k.repeat_interleave(HEADS // KV_HEADS, 1), big_v.repeat_interleave(HEADS // KV_HEADS, 1)
    n = q.shape[2]
    causal = torch.full((n, n), float("-inf")).triu(1)
    if window is not None:
        causal = causal.masked_fill(torch.ones(n, n, dtype=torch.bool).tril(-window - 1), float("-inf"))
    out = torch.softmax(big_q @ big_k.transpose(-1, -2) / HEAD_DIM**0.5 + causal, dim=-1) @ big_v
    o1, o2 = out[..., :HEAD_DIM], out[..., HEAD_DIM:]
    f = F.linear(o1, sd[a + "gating_phantom_1.weight"], sd[a + "gating_phantom_1.bias"])
    g = F.linear(o2, sd[a + "gating_phantom_2.weight"], sd[a + "gating_phantom_2.bias"])
    w = f.exp() / (f.exp() + g.exp())  # Eq. 3 as written
    return (w * o1 + (1 - w) * o2).transpose(1, 2).reshape(q.shape[0], n, HEADS * HEAD_DIM)


def reference_logits(
    arch: str, sd, input_ids, pixel_values, eta: float, window: int | None = None, image_token_id: int = IMG_CONTEXT
) -> torch.Tensor:
    """Logits of the published model, computed from its own tensors (no renaming, packed weights used packed)."""
    lm, eps, theta = "language_model.model.", LLM[arch]["rms_norm_eps"], LLM[arch]["rope_theta"]
    x = sd[lm + ("tok_embeddings" if arch == "internlm2" else "embed_tokens") + ".weight"][input_ids]
    x = x.clone()
    x[input_ids == image_token_id] = reference_vision(sd, pixel_values).reshape(-1, HIDDEN)
    b, n, _ = x.shape
    q_size, kv_size, group = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, HEADS // KV_HEADS
    for i in range(LAYERS):
        p = f"{lm}layers.{i}."
        a = p + ATTENTION[arch] + "."
        h = rms_norm(x, sd[p + ("attention_norm" if arch == "internlm2" else "input_layernorm") + ".weight"], eps)
        if arch == "qwen2":
            q, k, v = (F.linear(h, sd[a + f"{t}_proj.weight"], sd[a + f"{t}_proj.bias"]) for t in "qkv")
        elif arch == "internlm2":  # b q (h gs d) -> b q h gs d, gs = group + 2
            packed = F.linear(h, sd[a + "wqkv.weight"]).reshape(b, n, KV_HEADS, group + 2, HEAD_DIM)
            q = packed[..., :group, :].reshape(b, n, q_size)
            k, v = packed[..., -2, :].reshape(b, n, kv_size), packed[..., -1, :].reshape(b, n, kv_size)
        else:
            q, k, v = F.linear(h, sd[a + "qkv_proj.weight"]).split([q_size, kv_size, kv_size], dim=-1)
        q = rotate(q.reshape(b, n, HEADS, HEAD_DIM).transpose(1, 2), theta)
        k = rotate(k.reshape(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2), theta)
        v = v.reshape(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
        attn = phantom_attention(sd, a, q, k, v, eta, window)
        x = x + F.linear(attn, sd[a + ("wo" if arch == "internlm2" else "o_proj") + ".weight"])
        h = rms_norm(x, sd[p + ("ffn_norm" if arch == "internlm2" else "post_attention_layernorm") + ".weight"], eps)
        if arch == "internlm2":
            mlp = F.linear(F.silu(F.linear(h, sd[p + "feed_forward.w1.weight"])) * F.linear(h, sd[p + "feed_forward.w3.weight"]), sd[p + "feed_forward.w2.weight"])
        elif arch == "phi3":
            gate, up = F.linear(h, sd[p + "mlp.gate_up_proj.weight"]).chunk(2, dim=-1)
            mlp = F.linear(up * F.silu(gate), sd[p + "mlp.down_proj.weight"])
        else:
            mlp = F.linear(F.silu(F.linear(h, sd[p + "mlp.gate_proj.weight"])) * F.linear(h, sd[p + "mlp.up_proj.weight"]), sd[p + "mlp.down_proj.weight"])
        x = x + mlp
    x = rms_norm(x, sd[lm + "norm.weight"], eps)
    return F.linear(x, sd["language_model." + ("output" if arch == "internlm2" else "lm_head") + ".weight"])


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows: an anchor token, one image tile (`<img>` + 4 x `<IMG_CONTEXT>` + `</img>`), then text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2):
        text = torch.randint(3, 90, (6,), generator=g).tolist()
        rows.append([1, IMG_START, *[IMG_CONTEXT] * TOKENS_PER_TILE, IMG_END, *text])
    return torch.tensor(rows), torch.randn(2, 3, IMAGE, IMAGE, generator=g)


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, layout", [("qwen2", "safetensors"), ("internlm2", "sharded-bin"), ("phi3", "sharded-safetensors")]
)
def test_converted_model_matches_published_computation(tmp_path: Path, arch: str, layout: str) -> None:
    state = published_state(arch)
    if arch == "internlm2":  # old checkpoints also hold derived rotary buffers: skipped, not an error
        state["language_model.model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(HEAD_DIM // 2)
    src = write_published(tmp_path / "published", arch, state, layout)
    if arch == "qwen2":
        write_tokenizer(src)
    dst = tmp_path / "converted"
    convert_checkpoint(src, dst, max_shard_size=40_000 if arch == "phi3" else "5GB")

    if arch == "phi3":
        assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1 and (dst / "model.safetensors.index.json").is_file()
    for name in ("configuration_phantom.py", "modeling_phantom.py", "cache_phantom.py", "presets_phantom.py"):
        assert (dst / name).is_file()
    if importlib.util.find_spec("phantom_hf.hub") is not None:
        assert "image-text-to-text" in (dst / "README.md").read_text()
    config = json.loads((dst / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_phantom.PhantomForConditionalGeneration"
    assert config["image_token_id"] == IMG_CONTEXT
    if arch == "qwen2":  # the image tokens were added to the tokenizer at the ids the checkpoint uses
        processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
        tokens = ["<img>", "</img>", "<IMG_CONTEXT>"]
        assert processor.tokenizer.convert_tokens_to_ids(tokens) == [IMG_START, IMG_END, IMG_CONTEXT]
        assert processor.image_seq_length == TOKENS_PER_TILE and processor.tile_size == IMAGE
        chat = [{"role": "user", "content": "w5"}]
        assert processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True).endswith(
            "<|im_start|>assistant\n"
        )

    model = AutoModelForImageTextToText.from_pretrained(dst, trust_remote_code=True, phantom_eta=1.0, dtype=torch.float32)
    model.eval()
    input_ids, pixel_values = inputs()
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    state = {name: tensor.float() for name, tensor in state.items()}
    expected = reference_logits(arch, state, input_ids, pixel_values, eta=1.0)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # The Phantom path carries weight: the same model without its expansions (eta -> 0) is far off.
    without_phantom = reference_logits(arch, state, input_ids, pixel_values, eta=1e-9)
    assert (expected - without_phantom).abs().max() > 1e-2
    if arch == "qwen2":  # the folder's own remote code, in an interpreter where phantom_hf is not imported
        torch.save({"input_ids": input_ids, "pixel_values": pixel_values}, tmp_path / "inputs.pt")
        remote_logits = load_remote_and_run(dst, tmp_path)
        torch.testing.assert_close(remote_logits, expected, rtol=1e-4, atol=1e-4)


REMOTE_SCRIPT = """
import sys, torch
from transformers import AutoModelForImageTextToText
dst, work = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(dst, trust_remote_code=True, phantom_eta=1.0, dtype=torch.float32).eval()
assert "phantom_hf" not in sys.modules and not type(model).__module__.startswith("phantom_hf"), type(model).__module__
with torch.no_grad():
    torch.save(model(**torch.load(work + "/inputs.pt")).logits, work + "/logits.pt")
"""


def load_remote_and_run(dst: Path, work: Path) -> torch.Tensor:
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(dst), str(work)], cwd=work, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work / "logits.pt")


@pytest.fixture()
def qwen2_state() -> dict[str, torch.Tensor]:
    return published_state("qwen2")


def _refusal(tmp_path: Path, state: dict[str, torch.Tensor], make_dst: bool, layout: str = "safetensors") -> tuple[str, Path]:
    src = write_published(tmp_path / "published", "qwen2", state, layout)
    dst = tmp_path / "converted"
    if make_dst:
        dst.mkdir()
    with pytest.raises(ValueError) as error:
        convert_checkpoint(src, dst)
    assert (not dst.exists()) if not make_dst else (list(dst.iterdir()) == [])
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging left behind
    return str(error.value), dst


def test_refuses_missing_tensor(tmp_path: Path, qwen2_state) -> None:
    del qwen2_state["language_model.model.layers.1.self_attn.xattn_key_phantom.linear_v.weight"]
    message, _ = _refusal(tmp_path, qwen2_state, make_dst=False)
    assert "1 target tensor(s) left unfilled" in message
    assert "model.language_model.layers.1.self_attn.xattn_key_phantom.linear_v.weight" in message


def test_refuses_extra_tensor(tmp_path: Path, qwen2_state) -> None:
    qwen2_state["language_model.model.layers.0.self_attn.extra_phantom.weight"] = torch.zeros(4)
    message, _ = _refusal(tmp_path, qwen2_state, make_dst=True, layout="bin")
    assert "1 source tensor(s) without a target" in message
    assert "language_model.model.layers.0.self_attn.extra_phantom.weight" in message


def test_refuses_mis_shaped_tensor(tmp_path: Path, qwen2_state) -> None:
    qwen2_state["vision_proj.1.weight"] = torch.zeros(HIDDEN, 4 * VIT_HIDDEN - 1)
    qwen2_state["vision_model.encoder.layers.0.attn.qkv.weight"] = torch.zeros(3 * VIT_HIDDEN + 3, VIT_HIDDEN)
    message, _ = _refusal(tmp_path, qwen2_state, make_dst=True)
    assert "2 shape mismatch(es)" in message
    assert f"vision_proj.1.weight: expected ({HIDDEN}, {4 * VIT_HIDDEN}), found ({HIDDEN}, {4 * VIT_HIDDEN - 1})" in message
    assert f"attn.qkv.weight: expected ({3 * VIT_HIDDEN}, {VIT_HIDDEN}), found ({3 * VIT_HIDDEN + 3}, {VIT_HIDDEN})" in message


def test_refuses_bad_destination_and_preset(tmp_path: Path, qwen2_state) -> None:
    src = write_published(tmp_path / "published", "qwen2", qwen2_state, "safetensors", config=False)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        convert_checkpoint(src, occupied, preset="phantom-0.5b")
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="pass preset="):
        convert_checkpoint(src, tmp_path / "a")  # no config.json and no preset
    # a preset whose dimensions do not fit the weights: every tensor is reported, nothing written
    with pytest.raises(ValueError, match="shape mismatch") as error:
        convert_checkpoint(src, tmp_path / "b", preset="phantom-0.5b")
    assert "model.language_model.embed_tokens.weight" in str(error.value) or "embed_tokens" in str(error.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (src / "config.json").write_text(json.dumps(published_config("qwen2")))
    with pytest.raises(ValueError, match="is not a phantom-7b: text_config.hidden_size: preset 4096, checkpoint 64"):
        convert_checkpoint(src, tmp_path / "c", preset="phantom-7b")


def test_command_line_casts_dtype(tmp_path: Path, qwen2_state, capsys) -> None:
    src = write_published(tmp_path / "published", "qwen2", qwen2_state, "bin")
    parser = add_convert_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(src), str(tmp_path / "out"), "--preset", "phantom-0.5b", "--dtype", "bfloat16"])
    with pytest.raises(ValueError, match="is not a phantom-0.5b"):  # the tiny checkpoint is not the real size
        run_convert(args)
    args = parser.parse_args([str(src), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert run_convert(args) == 0
    assert f"image_token_id={IMG_CONTEXT}" in capsys.readouterr().out
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as handle:
        weight = handle.get_tensor("model.multi_modal_projector.linear_1.weight")
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight, qwen2_state["vision_proj.1.weight"].to(torch.bfloat16), rtol=0, atol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------------
# Phi-3's sliding window, as published
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_phi3_sliding_window_attends_as_published(tmp_path: Path, attn_implementation: str) -> None:
    """A published window of 3 on a 13-token prompt: the converted model sees what the published flash-attention
    call sees (4 keys per query), uncached and cached in both cache modes, token by token."""
    window = 3
    state = published_state("phi3")
    src = write_published(tmp_path / "published", "phi3", state, "safetensors")
    published = published_config("phi3")
    published["llm_config"]["sliding_window"] = window
    (src / "config.json").write_text(json.dumps(published))
    convert_checkpoint(src, tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["text_config"]["sliding_window"] == window + 1

    model = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "converted", trust_remote_code=True, phantom_eta=1.0, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    input_ids, pixel_values = inputs()
    state = {name: tensor.float() for name, tensor in state.items()}
    expected = reference_logits("phi3", state, input_ids, pixel_values, eta=1.0, window=window)
    # the window matters here: one key fewer (what copying 3 into transformers' sliding_window gives) is far off
    assert (expected - reference_logits("phi3", state, input_ids, pixel_values, eta=1.0, window=window - 1)).abs().max() > 1e-2
    prefill_length = 2 + TOKENS_PER_TILE + 1  # the anchor, the image, and one text token
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, pixel_values=pixel_values).logits, expected, rtol=1e-4, atol=1e-4)
        for mode in ("expanded", "compact"):
            out = model(input_ids=input_ids[:, :prefill_length], pixel_values=pixel_values, use_cache=True, phantom_cache_mode=mode)
            cache, steps = cache_of(out), [out.logits]
            assert cache.mode == mode
            for position in range(prefill_length, input_ids.shape[1]):
                out = model(input_ids=input_ids[:, position : position + 1], **cache_kwargs(cache))
                steps.append(out.logits)
            torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Writing the destination: in one step, no staging left behind, floating-point dtypes only
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interrupt_at", [1, 3])
def test_interrupted_publication_leaves_no_partial_destination(tmp_path: Path, qwen2_state, monkeypatch, interrupt_at: int) -> None:
    """The N-th rename of the conversion is interrupted (Ctrl-C): the destination is absent, or complete."""
    src = write_published(tmp_path / "published", "qwen2", qwen2_state, "safetensors")
    write_tokenizer(src)
    convert_checkpoint(src, tmp_path / "reference")
    complete = sorted(path.name for path in (tmp_path / "reference").iterdir())
    calls = []

    def interrupt(function):
        def wrapped(*args, **kwargs):
            calls.append(args)
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(Path, "rename", interrupt(Path.rename))
    monkeypatch.setattr(os, "rename", interrupt(os.rename))
    monkeypatch.setattr(os, "replace", interrupt(os.replace))
    dst = tmp_path / "converted"
    try:
        convert_checkpoint(src, dst)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert not dst.exists() or sorted(path.name for path in dst.iterdir()) == complete
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


@pytest.mark.parametrize("dtype", ["int8", torch.int8, "bool", "uint8", "not_a_dtype"])
def test_non_floating_dtypes_are_refused_before_writing(tmp_path: Path, qwen2_state, dtype) -> None:
    src = write_published(tmp_path / "published", "qwen2", qwen2_state, "safetensors")
    with pytest.raises(ValueError, match="dtype must name a floating-point torch dtype .* nothing was written"):
        convert_checkpoint(src, tmp_path / "converted", dtype=dtype)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["published"]


# ---------------------------------------------------------------------------------------------------
# Unreadable sources: every error names the file (and for weights, which weight file)
# ---------------------------------------------------------------------------------------------------


class _Carrier:
    """An object a plain tensor pickle cannot hold (unpickling it would import and run this module's code)."""


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    "layout, damage, message",
    [
        ("sharded-safetensors", lambda f: _cut(f / "model-00002-of-00002.safetensors", 0), "model-00002-of-00002.safetensors (weight file 2 of 2) cannot be read"),
        ("sharded-safetensors", lambda f: _cut(f / "model-00002-of-00002.safetensors", 20), "model-00002-of-00002.safetensors (weight file 2 of 2) cannot be read"),
        ("sharded-safetensors", lambda f: _cut(f / "model-00001-of-00002.safetensors", -100), "model-00001-of-00002.safetensors (weight file 1 of 2) cannot be read"),
        ("sharded-safetensors", lambda f: (f / "model.safetensors.index.json").write_text("{\"weight_map\": {"), "model.safetensors.index.json is not valid JSON"),
        ("sharded-safetensors", lambda f: (f / "model.safetensors.index.json").write_text("{\"metadata\": {}}"), "model.safetensors.index.json has no weight_map"),
        ("safetensors", lambda f: (f / "config.json").write_text("{\"llm_config\": "), "config.json is not valid JSON"),
        ("sharded-bin", lambda f: _cut(f / "pytorch_model-00002-of-00002.bin", 50), "pytorch_model-00002-of-00002.bin (weight file 2 of 2) cannot be read"),
        ("bin", lambda f: torch.save({"weight": torch.zeros(1), "extra": _Carrier()}, f / "pytorch_model.bin"), "pytorch_model.bin (weight file 1 of 1) was refused as unsafe"),
    ],
)
def test_unreadable_sources_are_refused_naming_the_file(tmp_path: Path, qwen2_state, capsys, layout: str, damage, message: str) -> None:
    src = write_published(tmp_path / "published", "qwen2", qwen2_state, layout)
    damage(src)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        convert_checkpoint(src, tmp_path / "converted")
    assert "weights_only" not in str(error.value) and not (tmp_path / "converted").exists()
    from phantom_hf import cli

    assert cli.main(["convert", str(src), str(tmp_path / "converted")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(src) in err, err


@pytest.mark.parametrize("integer", [torch.uint16, torch.int8])
def test_integer_weights_are_refused_by_name_and_float8_weights_are_converted(tmp_path: Path, qwen2_state, integer) -> None:
    name = "vision_proj.1.weight"
    as_integer = {**qwen2_state, name: qwen2_state[name].abs().mul(100).to(integer)}
    try:
        src = write_published(tmp_path / "integer", "qwen2", as_integer, "safetensors")
    except KeyError:  # safetensors before 0.5 (the floor, 0.4.3) has no uint16
        pytest.skip(f"safetensors {importlib.metadata.version('safetensors')} cannot write {integer}")
    with pytest.raises(ValueError, match=rf"1 weight\(s\) not floating-point .*{re.escape(name)}: {integer} in model.safetensors"):
        convert_checkpoint(src, tmp_path / "converted")
    as_float8 = {**qwen2_state, name: qwen2_state[name].to(torch.float8_e4m3fn)}
    src = write_published(tmp_path / "float8", "qwen2", as_float8, "safetensors")
    convert_checkpoint(src, tmp_path / "converted", dtype="float32")
    with safe_open(tmp_path / "converted" / "model.safetensors", framework="pt") as handle:
        converted = handle.get_tensor("model.multi_modal_projector.linear_1.weight")
    assert torch.equal(converted, as_float8[name].float())
