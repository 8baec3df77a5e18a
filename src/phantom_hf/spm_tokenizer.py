"""A SentencePiece `tokenizer.model` as a fast tokenizer (`tokenizer.json`), converted once, without sentencepiece.

Published checkpoints whose language model is InternLM2 (Phantom-1.8B and -7B) ship a SentencePiece model and a
tokenizer class of their own (`tokenization_internlm2.py`), which needs `trust_remote_code` and the sentencepiece
package every time it is loaded. `phantom-hf convert` turns that model into a `tokenizers` tokenizer instead: the
converted folder then loads with `AutoTokenizer` / `AutoProcessor` alone.

The model file is a protocol-buffer message; `read_sentencepiece_model` decodes the few fields a tokenizer needs
(pieces with scores and types, the model type, byte fallback, the normalizer settings) with a small reader of the
protocol-buffer wire format, so neither sentencepiece nor protobuf is needed, at conversion or at use.

What the result reproduces is the slow tokenizer the published code runs (transformers' `PreTrainedTokenizer`
with `_tokenize = sp_model.encode`): the text is split around the tokens of `added_tokens_decoder`, and each
remaining piece is encoded by SentencePiece on its own (so each gets SentencePiece's dummy prefix). In
`tokenizers` terms: the added tokens are split off first, then the normalizer (dummy prefix, whitespace as "▁")
and the BPE (or Unigram) model with byte fallback run on each piece. BPE merges are derived from the vocabulary:
every split of a piece into two pieces, ranked by the merged piece's score, which is how SentencePiece's BPE picks
its next merge.

One difference remains: a user-defined SentencePiece piece that the config does not list as an added token is
split off like an added token, so text right after it gets the dummy prefix and text starting with it does not
(SentencePiece matches it inside the text). InternLM2 lists its placeholder pieces as added tokens, and such a
piece appears in text only when typed literally (e.g. "[UNUSED_TOKEN_146]").
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

# SentencePiece's piece types (sentencepiece_model.proto, `SentencePiece.Type`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
WHITESPACE = "\u2581"  # "▁", SentencePiece's escaped space


@dataclass
class SentencePieceModel:
    """The fields of a SentencePiece model a tokenizer needs (defaults are the protocol buffer's)."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type) by id
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data):
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of one protocol-buffer message, in order; a
    length-delimited value is its bytes, a 32-bit value its 4 bytes, a varint its int."""
    result, position = [], 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 1:
            value, position = data[position : position + 8], position + 8
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire_type == 5:
            value, position = data[position : position + 4], position + 4
        else:
            raise ValueError(f"unsupported protocol-buffer wire type {wire_type}")
        if position > len(data):
            raise ValueError("truncated field")
        result.append((number, wire_type, value))
    return result


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """Decode a SentencePiece `tokenizer.model` (field numbers of sentencepiece_model.proto: ModelProto 1 pieces,
    2 trainer_spec, 3 normalizer_spec; SentencePiece 1 piece, 2 score, 3 type; TrainerSpec 3 model_type,
    24 treat_whitespace_as_suffix, 35 byte_fallback, 40 unk_id; NormalizerSpec 1 name, 2 precompiled_charsmap,
    3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces). `ValueError` naming the file when it is
    not one."""
    path = Path(path)
    model = SentencePieceModel()
    try:
        for number, wire_type, value in _fields(path.read_bytes()):
            if number == 1 and wire_type == 2:
                piece, score, kind = "", 0.0, NORMAL
                for sub_number, sub_wire, sub_value in _fields(value):
                    if sub_number == 1 and sub_wire == 2:
                        piece = sub_value.decode("utf-8")
                    elif sub_number == 2 and sub_wire == 5:
                        score = struct.unpack("<f", sub_value)[0]
                    elif sub_number == 3 and sub_wire == 0:
                        kind = sub_value
                model.pieces.append((piece, score, kind))
            elif number == 2 and wire_type == 2:
                for sub_number, sub_wire, sub_value in _fields(value):
                    if sub_wire != 0:
                        continue
                    if sub_number == 3:
                        model.model_type = sub_value
                    elif sub_number == 24:
                        model.treat_whitespace_as_suffix = bool(sub_value)
                    elif sub_number == 35:
                        model.byte_fallback = bool(sub_value)
                    elif sub_number == 40:
                        model.unk_id = sub_value
            elif number == 3 and wire_type == 2:
                for sub_number, sub_wire, sub_value in _fields(value):
                    if sub_number == 1 and sub_wire == 2:
                        model.normalizer_name = sub_value.decode("utf-8")
                    elif sub_number == 2 and sub_wire == 2:
                        model.precompiled_charsmap = bytes(sub_value)
                    elif sub_number == 3 and sub_wire == 0:
                        model.add_dummy_prefix = bool(sub_value)
                    elif sub_number == 4 and sub_wire == 0:
                        model.remove_extra_whitespaces = bool(sub_value)
                    elif sub_number == 5 and sub_wire == 0:
                        model.escape_whitespaces = bool(sub_value)
    except (ValueError, UnicodeDecodeError, struct.error) as error:
        raise ValueError(f"{path} is not a SentencePiece model ({error})") from error
    if not model.pieces:
        raise ValueError(f"{path} is not a SentencePiece model (it holds no pieces)")
    if model.model_type not in (UNIGRAM, BPE):
        raise ValueError(f"{path}: SentencePiece model type {model.model_type} is not supported (only unigram and BPE)")
    if model.treat_whitespace_as_suffix:
        raise ValueError(f"{path}: treat_whitespace_as_suffix=True is not supported")
    return model


def _bpe_merges(vocab: dict[str, int], scores: dict[str, float], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a mergeable piece, both halves in the vocabulary, ranked by the
    merged piece's score (highest first), then by the ids of the merged piece and of its halves."""
    ranked = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[piece], vocab[piece], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer(model: SentencePieceModel) -> normalizers.Normalizer | None:
    steps: list[normalizers.Normalizer] = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend(WHITESPACE))
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", WHITESPACE))
    return normalizers.Sequence(steps) if steps else None


def _added_tokens(folder: Path) -> dict[int, dict[str, Any]]:
    """Added tokens by id, from `tokenizer_config.json` (`added_tokens_decoder`) or the older `added_tokens.json`
    (then special when named in `special_tokens_map.json`)."""
    config = _read_json(folder / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder")
    if decoder:
        return {int(index): dict(entry) for index, entry in decoder.items()}
    added = _read_json(folder / "added_tokens.json")
    special = set(special_tokens_of(folder).values())
    special.update(_read_json(folder / "special_tokens_map.json").get("additional_special_tokens") or [])
    return {int(index): {"content": content, "special": content in special} for content, index in added.items()}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def special_tokens_of(folder: Path) -> dict[str, str]:
    """bos/eos/unk/pad token strings from `tokenizer_config.json`, completed by `special_tokens_map.json`."""
    config, special_map = _read_json(folder / "tokenizer_config.json"), _read_json(folder / "special_tokens_map.json")
    tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = _token_text(config.get(name)) or _token_text(special_map.get(name))
        if value is not None:
            tokens[name] = value
    return tokens


def fast_tokenizer_from_sentencepiece(folder: str | Path, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """The fast tokenizer equivalent to the SentencePiece tokenizer in `folder` (its `tokenizer.model`,
    `tokenizer_config.json` and, for older folders, `added_tokens.json` / `special_tokens_map.json`).

    The added tokens keep their ids: those inside the SentencePiece vocabulary rename the piece at that id (as
    InternLM2's `<|im_start|>` does), the others follow it in order. `add_bos_token` / `add_eos_token` of the
    config (default: BOS yes, EOS no, as InternLM2's and Llama's tokenizers) become the post-processor.
    `padding_side` applies unless the config names one (the published inference code pads on the left).
    """
    folder = Path(folder)
    model = read_sentencepiece_model(folder / "tokenizer.model")
    added = _added_tokens(folder)
    vocab_pieces = [piece for piece, _, _ in model.pieces]
    for index, entry in added.items():
        if index < len(vocab_pieces):
            vocab_pieces[index] = entry["content"]
    vocab = {piece: index for index, piece in enumerate(vocab_pieces)}
    scores = {piece: model.pieces[index][1] for index, piece in enumerate(vocab_pieces)}
    unk_piece = vocab_pieces[model.unk_id]
    if model.model_type == BPE:
        mergeable = {
            vocab_pieces[index]
            for index, (_, _, kind) in enumerate(model.pieces)
            if kind == NORMAL and index not in added and len(vocab_pieces[index]) > 1
        }
        backend = Tokenizer(
            models.BPE(
                vocab, _bpe_merges(vocab, scores, mergeable), unk_token=unk_piece, fuse_unk=True,
                byte_fallback=model.byte_fallback,
            )
        )  # fmt: skip
    else:
        backend = Tokenizer(
            models.Unigram([(piece, scores[piece]) for piece in vocab_pieces], model.unk_id, model.byte_fallback)
        )
    normalizer = _normalizer(model)
    if normalizer is not None:
        backend.normalizer = normalizer
    steps = [decoders.Replace(WHITESPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)

    tokens = [
        AddedToken(
            entry["content"], special=bool(entry.get("special", True)), normalized=bool(entry.get("normalized", False)),
            lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
            single_word=bool(entry.get("single_word", False)),
        )
        for _, entry in sorted(added.items())
    ]  # fmt: skip
    user_defined = [
        AddedToken(piece, special=False, normalized=False)
        for index, (piece, _, kind) in enumerate(model.pieces)
        if kind == USER_DEFINED and index not in added
    ]
    backend.add_tokens(user_defined)
    backend.add_special_tokens([token for token in tokens if token.special])
    backend.add_tokens([token for token in tokens if not token.special])
    wrong = {entry["content"]: (index, backend.token_to_id(entry["content"])) for index, entry in added.items()}
    wrong = {content: ids for content, ids in wrong.items() if ids[0] != ids[1]}
    if wrong:
        raise ValueError(
            f"{folder}: added tokens would change ids (content: (configured, obtained)): {wrong}; the ids after the "
            "SentencePiece vocabulary must follow it without gaps"
        )

    config = _read_json(folder / "tokenizer_config.json")
    special = special_tokens_of(folder)
    add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    bos, eos = special.get("bos_token"), special.get("eos_token")
    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    pair = single + ([f"{bos}:1"] if add_bos and bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos and eos else [])
    used = [token for token in (bos if add_bos else None, eos if add_eos else None) if token]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(token, backend.token_to_id(token)) for token in dict.fromkeys(used)]
    )
    options: dict[str, Any] = {"padding_side": config.get("padding_side") or padding_side}
    if isinstance(config.get("model_max_length"), int) and config["model_max_length"] < 10**12:
        options["model_max_length"] = config["model_max_length"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, add_bos_token=add_bos, add_eos_token=add_eos,
        **special, **options,
    )  # fmt: skip


__all__ = ["SentencePieceModel", "fast_tokenizer_from_sentencepiece", "read_sentencepiece_model", "special_tokens_of"]
