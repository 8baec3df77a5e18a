"""Shared fixtures: tiny Phantom models whose Phantom path matters (eta = 1, non-small weights)."""

from __future__ import annotations

import os

from phantom_hf_launch import prepare_openmp_environment

prepare_openmp_environment()  # before torch loads; the tests' subprocesses inherit it

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from phantom_hf import PhantomForConditionalGeneration  # noqa: E402
from phantom_hf.threads import use_cpu_thread_policy  # noqa: E402
from phantom_hf.tiny import tiny_phantom_config  # noqa: E402

use_cpu_thread_policy()  # the tests' models are tiny

IMAGE_TOKEN_ID = 5
PAD_TOKEN_ID = 0


def randomize_phantom_weights(model: torch.nn.Module, std: float = 0.5, seed: int = 0) -> None:
    """Give every Phantom parameter large random values, so that tests see the Phantom path at work."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "phantom" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * std)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> PhantomForConditionalGeneration:
    """A tiny Phantom model (Qwen2 GQA backbone, InternViT tower) with eta = 1 and random Phantom weights."""
    torch.manual_seed(seed)
    overrides.setdefault("phantom_eta", 1.0)
    config = tiny_phantom_config(image_token_id=IMAGE_TOKEN_ID, **overrides)
    config.text_config.pad_token_id = PAD_TOKEN_ID
    model = PhantomForConditionalGeneration(config).to(dtype).eval()
    randomize_phantom_weights(model, seed=seed)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


@pytest.fixture
def model() -> PhantomForConditionalGeneration:
    return make_model()


NEW_TOKENS = 8


def generate_fixed_length(
    model: PhantomForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_tokens: int = NEW_TOKENS,
    **kwargs,
):
    """`generate` exactly `new_tokens` tokens (never an image placeholder: a random model might emit one)."""
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            suppress_tokens=[IMAGE_TOKEN_ID],
            **kwargs,
        )


def image_beam_batch(model: PhantomForConditionalGeneration) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Two left-padded rows holding images of 2 tiles and 1 tile, and beam-search settings with their 3 tiles."""
    per_tile = model.config.image_seq_length
    input_ids, attention_mask = left_padded_batch([16, 12], seed=13)
    input_ids[0, 2 : 2 + 2 * per_tile] = IMAGE_TOKEN_ID
    input_ids[1, 6 : 6 + per_tile] = IMAGE_TOKEN_ID
    pixel_values = torch.randn(3, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return input_ids, attention_mask, dict(do_sample=False, num_beams=2, num_return_sequences=2, pixel_values=pixel_values)


def no_split_modules(model: torch.nn.Module) -> set[str]:
    """The module classes device_map="auto" keeps whole (collected from the submodels; the API moved in v5)."""
    if hasattr(model, "_get_no_split_modules"):
        return set(model._get_no_split_modules("auto"))
    return set(model._no_split_modules)


def left_padded_batch(lengths: list[int], seed: int = 0, vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts (ids >= 10, so no special ids) left-padded with PAD_TOKEN_ID to a common length."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(10, vocab, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask
