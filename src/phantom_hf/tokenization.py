"""Offline tokenizers for tests, examples and the demo: a word-level vocabulary plus the special tokens Phantom
prompts use, built with the `tokenizers` library (no download)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .modeling.processing_phantom import IMAGE_TOKENS

UNK_TOKEN = "<unk>"
PAD_TOKEN = "<|endoftext|>"
# Turn markers of both published chat formats (ChatML and Phi-3) and the image tokens of InternVL (paper Sec. 4).
DEFAULT_SPECIAL_TOKENS = (
    UNK_TOKEN,
    PAD_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    *IMAGE_TOKENS,
)
# Role names appear as plain words in ChatML headers (`<|im_start|>user\n`).
ROLE_WORDS = ("system", "user", "assistant")


def build_tokenizer(
    words: Iterable[str],
    special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
    *,
    unk_token: str = UNK_TOKEN,
    pad_token: str = PAD_TOKEN,
    eos_token: str = "<|im_end|>",
    bos_token: str | None = None,
    padding_side: str = "left",
    model_max_length: int | None = None,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` over a fixed word list, built offline.

    Ids: the special tokens first, in the given order (so with the defaults `<unk>` is 0 and `<IMG_CONTEXT>` is
    10), then the ChatML role words and `words` in order, duplicates dropped. Text is split on whitespace and
    punctuation (`\\w+|[^\\w\\s]+`); unknown pieces map to `unk_token`. Special tokens are matched anywhere in
    the text, never split, and skipped by `decode(..., skip_special_tokens=True)`; decoding joins words with
    spaces. `padding_side` defaults to "left" (generation); set "right" for training.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    for token in (unk_token, pad_token, eos_token, bos_token):
        if token is not None and token not in special_tokens:
            raise ValueError(f"{token!r} is used as unk/pad/eos/bos token but is not in special_tokens")
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *ROLE_WORDS, *words]:
        if not isinstance(token, str) or not token:
            raise ValueError(f"vocabulary entries must be non-empty strings, got {token!r}")
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(special_tokens)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk_token,
        pad_token=pad_token,
        eos_token=eos_token,
        bos_token=bos_token,
        padding_side=padding_side,
    )
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


__all__ = ["DEFAULT_SPECIAL_TOKENS", "PAD_TOKEN", "ROLE_WORDS", "UNK_TOKEN", "build_tokenizer"]
