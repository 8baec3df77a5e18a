"""SentencePiece tokenizers (InternLM2's, Phantom-1.8B/7B) rebuilt as fast tokenizers at conversion.

A small SentencePiece model is trained here (sentencepiece is a test dependency only) with what InternLM2's has:
byte fallback, user-defined placeholder pieces that `added_tokens_decoder` renames (`<|im_start|>`, `<|im_end|>`),
and InternVL's image tokens after the vocabulary. The reference is the published slow tokenizer's rule, restated:
split the text around the added tokens, encode every other piece with SentencePiece on its own (transformers'
`PreTrainedTokenizer.tokenize` with InternLM2Tokenizer's `_tokenize = sp_model.encode`).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phantom_hf.convert import convert_checkpoint
from phantom_hf.spm_tokenizer import fast_tokenizer_from_sentencepiece, read_sentencepiece_model

from .test_convert import HIDDEN, published_config, published_state, write_published

spm = pytest.importorskip("sentencepiece")

WORDS = "the cat sat on a mat describe image in detail what is this colour red blue green answer question word".split()
EXTRA = ["<img>", "</img>", "<IMG_CONTEXT>"]  # InternVL's tokenizer adds these (and more) after the vocabulary


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    endings = ["", ".", "?", "\n", " 12", "  x", " Été"]
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(endings) for _ in range(2000)]


def write_internlm2_tokenizer(folder: Path, model_type: str = "bpe", normalization: str = "identity") -> dict[int, str]:
    """tokenizer.model + an InternLM2-style tokenizer_config.json (remote tokenizer class, added_tokens_decoder
    renaming two placeholder pieces, image tokens after the vocabulary); returns the added tokens by id."""
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=300, model_type=model_type, byte_fallback=True,
        user_defined_symbols=["[UNUSED_TOKEN_0]", "[UNUSED_TOKEN_1]"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, normalization_rule_name=normalization,
        remove_extra_whitespaces=normalization != "identity", minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    size = processor.get_piece_size()
    placeholders = [i for i in range(size) if processor.id_to_piece(i).startswith("[UNUSED_TOKEN_")]
    added = {0: "<unk>", 1: "<s>", 2: "</s>", placeholders[0]: "<|im_end|>", placeholders[1]: "<|im_start|>"}
    added |= {size + i: token for i, token in enumerate(EXTRA)}
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": {str(i): {"content": token, **entry} for i, token in added.items()},
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # the checkpoint's own tokenizer code: running it would fail the test
    (folder / "tokenization_internlm2.py").write_text("raise ImportError('the checkpoint code must not run')\n")
    return added


def published_ids(folder: Path, added: dict[int, str], text: str) -> list[int]:
    """The published slow tokenizer's ids for `text` (add_special_tokens=False)."""
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = {token: index for index, token in added.items()}
    pattern = "(" + "|".join(re.escape(token) for token in sorted(ids, key=len, reverse=True)) + ")"
    result = []
    for piece in re.split(pattern, text):
        if piece:
            result += [ids[piece]] if piece in ids else processor.encode(piece)
    return result


CHAT = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>Describe the image in detail<|im_end|><|im_start|>assistant\n"
TEXTS = [
    CHAT, "  leading and  double spaces ", "trailing\n\n", "été café 中文 🙂", "<s>the cat</s>", "", " ", "ｆｕｌｌ １２",
    "<|im_start|><|im_end|>", "what is this?\nAnswer with the option's letter.",
]  # fmt: skip


@pytest.mark.parametrize("model_type, normalization", [("bpe", "identity"), ("bpe", "nmt_nfkc"), ("unigram", "identity")])
def test_fast_tokenizer_gives_the_published_ids(tmp_path: Path, model_type: str, normalization: str) -> None:
    added = write_internlm2_tokenizer(tmp_path, model_type, normalization)
    model = read_sentencepiece_model(tmp_path / "tokenizer.model")
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert [piece for piece, _, _ in model.pieces] == [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    assert [score for _, score, _ in model.pieces] == pytest.approx([processor.get_score(i) for i in range(processor.get_piece_size())])
    assert (model.model_type, model.byte_fallback, model.normalizer_name) == ({"unigram": 1, "bpe": 2}[model_type], True, normalization)

    fast = fast_tokenizer_from_sentencepiece(tmp_path)
    texts = TEXTS + corpus(seed=1)[:300]
    mismatched = [text for text in texts if fast(text, add_special_tokens=False)["input_ids"] != published_ids(tmp_path, added, text)]
    assert mismatched == []
    assert fast("the cat")["input_ids"][0] == 1 and fast("the cat", add_special_tokens=False)["input_ids"][0] != 1
    assert [fast.convert_tokens_to_ids(token) for token in ("<|im_start|>", "<|im_end|>", *EXTRA)] == [
        index for token in ("<|im_start|>", "<|im_end|>", *EXTRA) for index, content in added.items() if content == token
    ]
    assert fast.decode(fast("the cat sat on a mat.")["input_ids"], skip_special_tokens=True) == "the cat sat on a mat."
    assert (fast.bos_token, fast.eos_token, fast.pad_token, fast.padding_side) == ("<s>", "</s>", "</s>", "left")


def test_not_a_sentencepiece_model_is_named(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\xff\xff\xff\xff not a model")
    with pytest.raises(ValueError, match="tokenizer.model is not a SentencePiece model"):
        read_sentencepiece_model(tmp_path / "tokenizer.model")


LOAD_WITHOUT_SENTENCEPIECE = """
import sys, json
sys.modules["sentencepiece"] = None  # any import of sentencepiece fails
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)
import phantom_hf
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=False)
print(json.dumps({"tokenizer": tokenizer(sys.argv[2], add_special_tokens=False)["input_ids"],
                  "processor": processor(text=sys.argv[2])["input_ids"][0], "class": type(processor).__name__}))
"""


def test_convert_writes_a_fast_tokenizer_for_internlm2(tmp_path: Path) -> None:
    """Without --trust-remote-code: the converted folder's processor loads without remote code and without
    sentencepiece, and feeds the published ids (no BOS: the published format)."""
    added = write_internlm2_tokenizer(tmp_path / "published")
    vocab = max(added) + 1
    state = published_state("internlm2")
    g = torch.Generator().manual_seed(3)
    state["language_model.model.tok_embeddings.weight"] = torch.randn(vocab, HIDDEN, generator=g)
    state["language_model.output.weight"] = torch.randn(vocab, HIDDEN, generator=g) * 0.2
    src = write_published(tmp_path / "published", "internlm2", state, "safetensors")
    config = published_config("internlm2")
    config["llm_config"]["vocab_size"] = vocab
    config["image_token_index"] = next(i for i, token in added.items() if token == "<IMG_CONTEXT>")
    (src / "config.json").write_text(json.dumps(config))
    dst = tmp_path / "converted"
    convert_checkpoint(src, dst)
    assert (dst / "tokenizer.json").is_file() and not (dst / "tokenization_internlm2.py").exists()
    assert "AutoTokenizer" not in json.loads((dst / "tokenizer_config.json").read_text()).get("auto_map", {})

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_SENTENCEPIECE, str(dst), CHAT], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    expected = published_ids(src, added, CHAT)
    assert loaded == {"tokenizer": expected, "processor": expected, "class": "PhantomProcessor"}
