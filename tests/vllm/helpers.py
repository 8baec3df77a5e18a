"""Tiny Phantom folders for the vLLM tests and transformers' reference generations on them (no vllm import here)."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import MistralConfig, Phi3Config, Qwen3Config

from phantom_hf import PhantomConfig, PhantomForConditionalGeneration
from phantom_hf.modeling.processing_phantom import PhantomProcessor
from phantom_hf.tiny import tiny_text_config, tiny_vision_config
from phantom_hf.tokenization import build_tokenizer

SKIP_REASON = "vllm is not installed in this environment: the vLLM tests run in their own venv (.ci/vllm-pass.sh)"
WORDS = [f"w{i}" for i in range(60)] + ["what", "is", "in", "the", "image", "?", "a", "cat", "dog", "."]
MAX_MODEL_LEN = 512
# Prefills longer than this are chunked, so the tests run chunked prefill across the anchor and the images.
MAX_BATCHED_TOKENS = 32


def import_vllm() -> ModuleType:
    """vllm, or a skip of the calling module where it is not installed (an error under PHANTOM_HF_REQUIRE_VLLM=1)."""
    if os.environ.get("PHANTOM_HF_REQUIRE_VLLM") == "1":
        import vllm

        return vllm
    return pytest.importorskip("vllm", reason=SKIP_REASON)


def text_config(backbone: str, vocab_size: int, pad_token_id: int, **overrides: Any) -> Any:
    """A 2-layer GQA decoder with head_dim 32 (vLLM's CPU attention takes head sizes from 32: 32 plain, 64 Phantom)."""
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_MODEL_LEN,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )
    shape.update(overrides)
    if backbone == "phi3":
        return Phi3Config(**{"bos_token_id": None, "eos_token_id": None, "sliding_window": None, **shape})
    if backbone == "qwen3":
        return Qwen3Config(**{"head_dim": 32, **shape})
    if backbone == "mistral":
        return MistralConfig(**{"sliding_window": None, **shape})
    return tiny_text_config(backbone, **shape)


def make_phantom(backbone: str = "qwen2", phantom: bool = True, seed: int = 0, **overrides: Any) -> tuple[PhantomForConditionalGeneration, PhantomProcessor]:
    """A tiny random float32 Phantom model (eta = 1 and large random Phantom weights, so that Phantom Dimension
    changes the tokens) with its processor: 28 px tiles of 4 vision tokens, the backbone's chat template."""
    tokenizer = build_tokenizer(WORDS, model_max_length=MAX_MODEL_LEN)
    text_overrides = overrides.pop("text_config", {})
    config = PhantomConfig(
        text_config=text_config(backbone, len(tokenizer), tokenizer.pad_token_id, **text_overrides),
        vision_config=tiny_vision_config(),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        phantom_dimension=phantom,
        phantom_eta=1.0,
        **overrides,
    )
    torch.manual_seed(seed)
    model = PhantomForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "phantom" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # fixed-length answers, as vLLM's ignore_eos
    return model, PhantomProcessor.from_config(config, tokenizer)


def without_phantom(model: PhantomForConditionalGeneration) -> PhantomForConditionalGeneration:
    """The same backbone, tower and projector with Phantom Dimension off."""
    config = PhantomConfig(**{**model.config.to_dict(), "phantom_dimension": False})
    plain = PhantomForConditionalGeneration(config).eval()
    missing, _ = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    plain.generation_config = model.generation_config
    return plain


def save(model: PhantomForConditionalGeneration, processor: PhantomProcessor, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def random_image(width: int, height: int, seed: int) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def chat_prompt(processor: PhantomProcessor, text: str, images: int = 0) -> str:
    """The processor's chat template around one user turn with `images` images before the text."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def as_vllm_prompt(prompt: str, images: list) -> dict:
    """A vLLM prompt: the text, and its images when there are any."""
    return {"prompt": prompt, "multi_modal_data": {"image": images}} if images else {"prompt": prompt}


def hf_greedy(
    model: PhantomForConditionalGeneration, processor: PhantomProcessor, prompt: str, images: list | None, new_tokens: int
) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy answer ids) of transformers' generate on the processor's encoding of `prompt`."""
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    prompt_ids = inputs["input_ids"][0].tolist()
    return prompt_ids, output[0, len(prompt_ids) :].tolist()


def vllm_engine(folder: Path, compiled: bool = False, **overrides: Any) -> Any:
    """vLLM's offline engine on `folder`, small (what a CPU test machine affords) and eager unless `compiled`:
    vLLM's compiled path (torch.compile, what CUDA graphs capture on a GPU) costs minutes of compilation per engine
    on the CPU, so the tests that compile are the few that cover it (the Phantom rows of test_vllm_generation.py
    and the tensor-parallel tests)."""
    from vllm import LLM

    settings = dict(
        model=str(folder),
        trust_remote_code=True,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=8,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        block_size=32,  # the CPU default (128) would leave the tests' prompts without a full block to cache
        enforce_eager=not compiled,
        limit_mm_per_prompt={"image": 3},
        seed=0,
    )
    settings.update(overrides)
    return LLM(**settings)


def shutdown(engine: Any) -> None:
    """Stop an in-process engine and free its KV cache before the next one starts."""
    import gc

    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()
