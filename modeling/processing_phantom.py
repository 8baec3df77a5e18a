"""Processor of Phantom vision-language models: dynamic image tiling, `<image>` expansion, chat templates.

Implements the published input side (InternVL's dynamic tiling, paper Sec. 4). Each image is cut into 1-6 tiles of the vision tower's
size (448 px for the published models) whose grid best matches its aspect ratio, plus a thumbnail when there
is more than one tile (transformers' `GotOcr2ImageProcessor`, PIL backend: no torchvision needed). Each
`<image>` marker in a prompt becomes `<img>` + `<IMG_CONTEXT>` x (image_seq_length x tiles) + `</img>`.

Prompts are written by the chat formats of `CHAT_FORMATS` (`chat_format_for` decides which one a model speaks).
Models trained with this package write an image as `<image>` + newline; a converted published checkpoint's
processor (`from_config(..., published_format=True)`, what `phantom-hf convert` writes) feeds the model what the
published Phantom inference code feeds it: `<image>` glued to the question, no BOS token added by the tokenizer
(`add_special_tokens=False`, so the template's first token is the Phantom anchor), and several images of one
prompt pasted side by side into one (`multi_image_layout="side_by_side"`).

LLaVA-style baselines (Xmodel-VLM, arXiv 2405.09215: CLIP or SigLIP towers, XDP or mlp2x_gelu projectors) see one fixed-size
image per `<image>`: CLIP images are padded to a square with the mean colour, resized and centre-cropped as
LLaVA-1.5 and Xmodel-VLM do (`image_aspect_ratio="pad"`; transformers' `LlavaImageProcessor`), SigLIP images are
resized; the marker becomes `<IMG_CONTEXT>` x image_seq_length alone, as LLaVA puts only image placeholders there.

Hub remote code: this file is uploaded next to the weights and imports only torch, transformers and the
Python standard library.
"""

from __future__ import annotations

import base64
import io
import os
import urllib.request
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (  # PIL: Pillow, as transformers' image utilities import it
    PIL,
    ChannelDimension,
    is_pil_image,
    to_numpy_array,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER, PreTrainedTokenizerBase
from transformers.utils import is_numpy_array

from .compat_phantom import ASSISTANT_MASK_FOLLOWS_EXPANSION, unmarked
from .presets_phantom import BASELINE_PRESETS, PRESETS

_ALL_PRESETS = {**PRESETS, **BASELINE_PRESETS}

IMAGE_MARKER = "<image>"
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_TOKENS = (IMAGE_START_TOKEN, IMAGE_END_TOKEN, IMAGE_CONTEXT_TOKEN)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
# Vision towers by how their images are prepared: InternViT tiles (paper Sec. 4), the others take one image.
TILING_VISION_MODEL_TYPES = ("internvl_vision",)
FIXED_SIZE_VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
DEFAULT_TILE_SIZE = 448
DEFAULT_MIN_PATCHES = 1
DEFAULT_MAX_PATCHES = 6
DEFAULT_IMAGE_SEQ_LENGTH = 256
# How several images of one prompt reach the model: "tiles" tiles each image on its own (one `<image>` each);
# "side_by_side" pastes them into one image first, left to right on black with SIDE_BY_SIDE_MARGIN pixels between
# them and each centred vertically, then tiles that image, as the published Phantom evaluation does (github
# ByungKwanLee/Phantom, test.py `EvalDataset.__getitem__` with utils/utils.py `concat_images_horizontally_with_margin`).
MULTI_IMAGE_LAYOUTS = ("tiles", "side_by_side")
SIDE_BY_SIDE_MARGIN = 10

# Chat templates. Assistant turns are wrapped in {% generation %} so that `return_assistant_tokens_mask=True` marks
# the answer and its end token (what the SFT loss trains on). An image block renders as `IMAGE_MARKER` followed by
# `image_separator`: "\n" in the templates this package trains with (InternVL's and LLaVA's convention, and the
# triples' `"<image>\n" + question`), "" in the published variants, which glue the marker to the question as the
# published Phantom inference code does (github ByungKwanLee/Phantom, utils/utils.py `make_instruction`:
# `question = "<image>" + question`, then user_start + question + user_end + assistant_start with split "").
def _content_macro(image_separator: str) -> str:
    return (
        "{%- macro render_content(content) -%}"
        "{%- if content is string -%}{{- content -}}"
        "{%- else -%}{%- for block in content -%}"
        "{%- if block['type'] == 'image' -%}{{- '" + IMAGE_MARKER + image_separator + "' -}}"
        "{%- elif block['type'] == 'text' -%}{{- block['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
    )


def _turn_template(header: str, end: str, generation_header: str, image_separator: str = "\\n") -> str:
    return (
        _content_macro(image_separator)
        + "{%- for message in messages -%}"
        + "{{- " + header + " -}}"
        + "{%- if message['role'] == 'assistant' -%}"
        + "{%- generation -%}{{- render_content(message['content']) + '" + end + "' -}}{%- endgeneration -%}"
        + "{%- else -%}{{- render_content(message['content']) + '" + end + "' -}}{%- endif -%}"
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}{{- '" + generation_header + "' -}}{%- endif -%}"
    )


_CHATML_TURN = ("'<|im_start|>' + message['role'] + '\\n'", "<|im_end|>", "<|im_start|>assistant\\n")
_PHI3_TURN = ("'<|' + message['role'] + '|>\\n'", "<|end|>", "<|assistant|>\\n")
# ChatML (Qwen2, InternLM2): <|im_start|>user\n…<|im_end|><|im_start|>assistant\n
CHATML_CHAT_TEMPLATE = _turn_template(*_CHATML_TURN)
# Phi-3: <|user|>\n…<|end|><|assistant|>\n
PHI3_CHAT_TEMPLATE = _turn_template(*_PHI3_TURN)

# Vicuna v1, the conversation format of LLaVA-1.5 and Xmodel-VLM (`conv_templates["v1"]` of their code):
# "{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: … ASSISTANT:". An image goes in front of its
# text followed by a newline, as in their data. The BOS token is not part of the template: the Llama tokenizer
# adds it when the prompt is tokenized, as their `tokenizer_image_token` does.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V1_CHAT_TEMPLATE = (
    _content_macro("\\n")
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    + "{{- render_content(messages[0]['content']) + ' ' -}}{%- set turns = messages[1:] -%}"
    + "{%- else -%}{{- '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + " ' -}}{%- set turns = messages -%}{%- endif -%}"
    + "{%- for message in turns -%}"
    + "{%- if message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    + "{%- generation -%}{{- render_content(message['content']) + '</s>' -}}{%- endgeneration -%}"
    + "{%- else -%}{{- 'USER: ' + render_content(message['content']) + ' ' -}}{%- endif -%}"
    + "{%- endfor -%}"
    + "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


class ChatFormat(NamedTuple):
    """A conversation format: its chat template, the published variant of it (None where there is none) and the
    decoder `model_type`s that speak it by default."""

    template: str
    published_template: str | None
    model_types: tuple[str, ...]


# The chat formats by name: the one table that decides how a model's prompts are written (the presets name their
# format here; `chat_format_for` resolves everything else). InternLM2 is loaded as Llama and speaks ChatML.
CHAT_FORMATS: dict[str, ChatFormat] = {
    "chatml": ChatFormat(
        CHATML_CHAT_TEMPLATE, _turn_template(*_CHATML_TURN, image_separator=""), ("qwen2", "qwen3", "llama", "mistral")
    ),
    "phi3": ChatFormat(PHI3_CHAT_TEMPLATE, _turn_template(*_PHI3_TURN, image_separator=""), ("phi3",)),
    "vicuna_v1": ChatFormat(VICUNA_V1_CHAT_TEMPLATE, None, ()),
}


def chat_format_for(source: Any) -> str:
    """The name of the chat format ("chatml", "phi3", "vicuna_v1") of `source`, the one place that decides it.

    `source` is a format name, a preset name ("phantom-3.8b": the format it was trained with), a decoder
    `model_type` ("phi3": Phi-3's; "qwen2", "llama", ...: ChatML), or a `PhantomConfig` (Vicuna v1 for a
    LLaVA-style projector "xdp" / "mlp2x_gelu", as LLaVA-1.5 and Xmodel-VLM; otherwise by its decoder).
    """
    if isinstance(source, str):
        if source in CHAT_FORMATS:
            return source
        preset = _ALL_PRESETS.get(source)
        if preset is not None:
            return preset["chat_format"]
        model_type = source
    elif getattr(source, "projector_type", "phantom") != "phantom":
        return "vicuna_v1"
    elif hasattr(source, "get_text_config"):
        model_type = source.get_text_config().model_type
    else:
        model_type = getattr(source, "model_type", None)
    for name, chat_format in CHAT_FORMATS.items():
        if model_type in chat_format.model_types:
            return name
    known = sorted(m for f in CHAT_FORMATS.values() for m in f.model_types)
    raise ValueError(
        f"no Phantom chat format for {model_type!r}; pass one of {sorted(CHAT_FORMATS)}, a preset name, or a decoder "
        f"model_type in {known}"
    )


def chat_template_for(source: Any, published: bool = False) -> str:
    """The chat template of `source` (anything `chat_format_for` takes).

    `published=True` gives the variant that writes prompts as the published Phantom inference code does (an image
    block is `<image>` glued to the text that follows, no newline); a `ValueError` for a format without one.
    """
    name = chat_format_for(source)
    template = CHAT_FORMATS[name].published_template if published else CHAT_FORMATS[name].template
    if template is None:
        raise ValueError(f"the {name!r} chat format has no published-Phantom variant")
    return template


def build_image_processor(
    tile_size: int = DEFAULT_TILE_SIZE,
    min_patches: int = DEFAULT_MIN_PATCHES,
    max_patches: int = DEFAULT_MAX_PATCHES,
) -> GotOcr2ImageProcessorPil:
    """InternVL dynamic tiling (paper Sec. 4): `tile_size` square tiles, 1 <= grid <= `max_patches`, thumbnail,
    bicubic resize, ImageNet mean/std."""
    if not 1 <= min_patches <= max_patches:
        raise ValueError(f"need 1 <= min_patches <= max_patches, got min_patches={min_patches}, max_patches={max_patches}")
    return GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        crop_to_patches=True,
        min_patches=min_patches,
        max_patches=max_patches,
        resample=3,  # PIL bicubic
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def build_fixed_size_image_processor(
    vision_model_type: str, image_size: int, pad_to_square: bool = True
) -> LlavaImageProcessorPil | SiglipImageProcessorPil:
    """One `image_size` x `image_size` image per `<image>` for a CLIP or SigLIP tower, bicubic, RGB.

    CLIP: LLaVA-1.5's preparation (transformers' `LlavaImageProcessor`): with `pad_to_square`, pad to a square
    with the mean colour (their `image_aspect_ratio="pad"`), then resize the shortest edge to `image_size`,
    centre-crop, OpenAI CLIP mean/std. SigLIP: resize to `image_size` x `image_size`, mean/std 0.5.
    """
    if vision_model_type == "clip_vision_model":
        return LlavaImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_pad=pad_to_square,
            resample=3,  # PIL bicubic
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
            do_convert_rgb=True,
        )
    if vision_model_type == "siglip_vision_model":
        if pad_to_square:
            raise ValueError("pad_to_square is for CLIP towers; SigLIP images are resized to a square as they are")
        return SiglipImageProcessorPil(
            size={"height": image_size, "width": image_size}, resample=3, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD
        )
    raise ValueError(
        f"no fixed-size image processor for vision model_type {vision_model_type!r}; known: {FIXED_SIZE_VISION_MODEL_TYPES}"
    )


def _is_tiling(image_processor: Any) -> bool:
    """Whether `image_processor` cuts images into several tiles (InternVL) rather than one image each."""
    return bool(getattr(image_processor, "crop_to_patches", False))


def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token` when the tokenizer encodes it as exactly that one token, else None."""
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None or tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        return None
    return token_id


def add_image_tokens(
    tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None, tokens: tuple[str, ...] = IMAGE_TOKENS
) -> list[str]:
    """Add `tokens` (default `<img>`, `</img>` and `<IMG_CONTEXT>`; LLaVA-style models need only `<IMG_CONTEXT>`)
    to `tokenizer` as special tokens where missing; with `model`, grow its token embeddings (and LM head) to the
    tokenizer's size if needed and set `config.image_token_id`.

    Returns the tokens that were added. Embeddings never shrink: published vocabularies are padded larger than
    their tokenizers, and new ids that fit in the matrix need no resize. The new rows are untrained (transformers
    initialises them to the mean of the old ones); train the embeddings before relying on them.
    """
    if IMAGE_CONTEXT_TOKEN not in tokens:
        raise ValueError(f"tokens must include {IMAGE_CONTEXT_TOKEN}, the image placeholder; got {tokens}")
    missing = [token for token in tokens if _single_token_id(tokenizer, token) is None]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if model is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        if hasattr(model.config, "image_token_id"):
            model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
    return missing


def _describe(image: Any) -> str:
    text = image if isinstance(image, str) else type(image).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _chat_has_images(conversation: Any) -> bool:
    """Whether a chat (or a batch of chats) holds an image part or an `<image>` marker in its text."""
    chats = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
    for message in (message for chat in chats for message in chat):
        content = message.get("content") if isinstance(message, dict) else None
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for part in parts:
            if isinstance(part, dict) and (part.get("type") == "image" or IMAGE_MARKER in str(part.get("text") or "")):
                return True
    return False


def _decode_image_bytes(data: bytes, where: str) -> Any:
    """A fully loaded PIL image from the bytes of an encoded image, turned upright by its EXIF orientation (as
    transformers' `load_image` does) and with its alpha channel kept. Read from memory: no file handle stays open,
    also when decoding fails."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
        return PIL.ImageOps.exif_transpose(image)
    except PIL.UnidentifiedImageError as error:
        raise ValueError(f"{where} cannot be decoded: not an image format Pillow knows") from error
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"{where} cannot be decoded: not a readable image ({error})") from error


# Seconds to wait for an image URL's server (to connect, and between bytes).
IMAGE_URL_TIMEOUT = 30.0


def _fetch(url: str, where: str) -> bytes:
    """The bytes an http(s) URL serves, or a `ValueError` naming the URL and the reason."""
    try:
        with urllib.request.urlopen(url, timeout=IMAGE_URL_TIMEOUT) as response:
            return response.read()
    except (OSError, ValueError) as error:  # URLError, HTTPError and timeouts are OSErrors
        raise ValueError(f"{where} cannot be fetched: {error}") from error


def _load_image_source(source: str, where: str) -> Any:
    """A PIL image from a local path, an http(s) URL or a base64 string (optionally a `data:image/...` URL): the
    encoded bytes, read or fetched, decoded by `_decode_image_bytes` (alpha kept, EXIF orientation applied)."""
    if source.startswith(("http://", "https://")):
        return _decode_image_bytes(_fetch(source, where), where)
    if os.path.isfile(source):
        try:
            with open(source, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise ValueError(f"{where} cannot be read: {error}") from error
        return _decode_image_bytes(data, where)
    encoded = source.split(",", 1)[1] if source.startswith("data:image/") else source
    try:
        data = base64.b64decode(encoded, validate=True)
    except ValueError:
        data = b""
    if not data:
        raise ValueError(f"{where} cannot be decoded: not a readable image file, URL or base64 image (no such file)")
    return _decode_image_bytes(data, where)


# PIL modes whose pixels are 16-bit integers (16-bit grayscale PNGs open as one of them, or as "I").
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _pil_to_array(image: Any, where: str) -> Any:
    """A channels-last numpy array of a PIL image: uint16 for 16-bit grayscale, float32 for mode "F" (scaled by
    `_as_uint8`), RGBA when the image has transparency, RGB otherwise."""
    if image.mode in _SIXTEEN_BIT_MODES:
        array = to_numpy_array(image)
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(f"{where} is a mode {image.mode} image with values in [{array.min()}, {array.max()}], outside 0-65535")
        return array.astype("uint16")
    if image.mode == "F":
        return to_numpy_array(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    return to_numpy_array(image.convert("RGBA" if has_alpha else "RGB"))


def _as_uint8(image: Any, where: str) -> Any:
    """Pixel values as uint8 0-255, the range the image processors rescale from.

    uint8 as is; uint16 (16-bit images) scaled by 255/65535; other integers must hold 0-255; floats in [0, 1] (e.g. a
    `ToTensor()` output) are scaled by 255, floats in [0, 255] rounded. Anything else (bool, complex, other ranges,
    NaN) is an error naming the dtype and range.
    """
    kind = image.dtype.kind
    if kind == "u" and image.dtype.itemsize == 1:
        return image
    if kind not in "uif":
        raise TypeError(
            f"{where} has dtype {image.dtype}: pass uint8 (0-255), uint16 (0-65535) or floating-point (0-1) pixel values"
        )
    if kind == "u" and image.dtype.itemsize == 2:
        return (image / 257.0).round().astype("uint8")
    low, high = image.min(), image.max()
    if kind == "f" and not (low == low and high == high and abs(low) != float("inf") and abs(high) != float("inf")):
        raise ValueError(f"{where} of dtype {image.dtype} holds NaN or infinite values")
    if kind == "f" and 0 <= low and high <= 1:
        return (image * 255.0).round().astype("uint8")
    if 0 <= low and high <= 255:
        return image.round().astype("uint8") if kind == "f" else image.astype("uint8")
    expected = "[0, 1] (or 0-255)" if kind == "f" else "0-255 (uint16 images: 0-65535)"
    raise ValueError(f"{where} of dtype {image.dtype} holds values in [{low}, {high}]; expected {expected}")


def _rgb_over_white(image: Any) -> Any:
    """An RGB (H, W, 3) uint8 array from a channels-last uint8 array of 1, 3 or 4 channels, transparency laid over
    white (what transformers' `convert_to_rgb(..., return_numpy=True)` does from 5.21 on; done here so that earlier
    releases give the same pixels)."""
    if image.shape[-1] == 1:
        return image.repeat(3, axis=-1)
    if image.shape[-1] != 4:
        return image
    alpha = image[..., 3:4] / 255.0
    return (alpha * image[..., :3] + (1 - alpha) * 255.0).round().astype("uint8")


def to_rgb_array(image: Any, name: str | None = None) -> Any:
    """`image` decoded as the processor decodes it (see `_to_rgb_array`): an RGB (H, W, 3) uint8 numpy array. For
    callers that check an image before the processor sees it (`phantom-hf chat`); `name` labels it in errors."""
    return _to_rgb_array(image, 0, name)


# Sizes an axis of channels may have: grayscale, RGB, RGBA.
_CHANNEL_COUNTS = (1, 3, 4)


def _channels_last(image: Any, where: str) -> Any:
    """A raw (H, W, C) or (C, H, W) array as (H, W, C), by the rule: the channel axis is the first or the last one,
    whichever alone has 1, 3 or 4 entries. Where both do ((3, 40, 3), a 1x1 (1, 1, 3)), the layout is ambiguous and
    refused rather than guessed: a guess makes a tiny image grey or turns it on its side."""
    first, last = image.shape[0] in _CHANNEL_COUNTS, image.shape[-1] in _CHANNEL_COUNTS
    if first and last:
        raise ValueError(
            f"{where} of shape {tuple(image.shape)} may be (H, W, C) or (C, H, W): both its first and last axes could "
            "hold the 1, 3 or 4 channels. Pass it as a PIL image (e.g. PIL.Image.fromarray(array) for an (H, W, C) "
            "uint8 array), or as a file or bytes"
        )
    if not (first or last):
        raise ValueError(f"{where} of shape {tuple(image.shape)} has no axis of 1, 3 or 4 channels first or last")
    return image.transpose(1, 2, 0) if first else image


def _to_rgb_array(image: Any, index: int, name: str | None = None) -> Any:
    """Decode one image into an RGB (H, W, 3) uint8 numpy array: the one place where a user's image becomes pixels.

    Accepts PIL images, local paths, http(s) URLs, base64 strings and encoded bytes (their layout is known), and
    numpy arrays and torch tensors of shape (H, W), or (H, W, C) / (C, H, W) with 1, 3 or 4 channels, the channel
    axis being the one of first and last that alone has 1, 3 or 4 entries (`_channels_last`: an array where both do
    is refused). Grayscale is repeated, alpha laid over white, 16-bit and floating-point pixel values scaled to
    0-255 (`_as_uint8`). Undecodable, zero-sized or ambiguous images raise `ValueError`, unknown types and dtypes
    `TypeError`.
    """
    where = name or f"image {index} ({_describe(image)})"
    if isinstance(image, (bytes, bytearray)):
        where = name or f"image {index} (bytes)"
        image = _decode_image_bytes(bytes(image), where)
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        image = _load_image_source(image, where)
    layout_known = is_pil_image(image)
    if layout_known:
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as error:
            raise ValueError(f"{where} cannot be decoded (truncated or corrupt image data: {error})") from error
        if min(image.size) == 0:
            raise ValueError(f"{where} has zero size ({image.size[0]}x{image.size[1]} pixels)")
        image = _pil_to_array(image, where)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.dtype in (torch.bfloat16, torch.float16) else image).numpy()
    if not is_numpy_array(image):
        raise TypeError(
            f"{where} has unsupported type {type(image).__name__}: pass a PIL image, a numpy array or torch tensor "
            "of shape (H, W), (H, W, C) or (C, H, W), a local path, an http(s) URL, or encoded image bytes"
        )
    if image.ndim not in (2, 3):
        raise ValueError(f"{where} must have shape (H, W), (H, W, C) or (C, H, W), got {tuple(image.shape)}")
    if image.size == 0:
        raise ValueError(f"{where} has zero size (shape {tuple(image.shape)})")
    if image.ndim == 2:
        image = image[..., None]
    elif not layout_known:
        image = _channels_last(image, where)
    return _rgb_over_white(_as_uint8(image, where))


def paste_side_by_side(images: list[Any], margin: int = SIDE_BY_SIDE_MARGIN) -> Any:
    """One (H, W, 3) array holding RGB (H, W, 3) arrays `images` left to right on black, `margin` pixels apart, each
    centred vertically (offset (max height - height) // 2), the canvas as high as the highest: the published
    Phantom layout of several images in one prompt. One image is returned as it is."""
    if len(images) == 1:
        return images[0]
    dtypes = {image.dtype for image in images}
    if len(dtypes) > 1:
        raise ValueError(
            f"images pasted side by side must share one pixel type, got {sorted(str(dtype) for dtype in dtypes)}; "
            "pass them all as uint8 (or all as floats)"
        )
    height = max(image.shape[0] for image in images)
    width = sum(image.shape[1] for image in images) + margin * (len(images) - 1)
    canvas = np.zeros((height, width, 3), dtype=images[0].dtype)
    left = 0
    for image in images:
        top = (height - image.shape[0]) // 2
        canvas[top : top + image.shape[0], left : left + image.shape[1]] = image
        left += image.shape[1] + margin
    return canvas


class PhantomProcessor(ProcessorMixin):
    r"""Builds Phantom's inputs from prompts and images: tiles every image, expands each `<image>` marker into
    `<img>` + `<IMG_CONTEXT>` x (`image_seq_length` x tiles) + `</img>`, tokenizes, and renders chats with the
    checkpoint's chat template. For LLaVA-style baselines (a fixed-size image processor) every image is one tile
    and its marker becomes `<IMG_CONTEXT>` x `image_seq_length`, unwrapped.

    Args:
        image_processor: a `GotOcr2ImageProcessor` with `crop_to_patches=True` (default: `build_image_processor()`,
            448 px tiles, 1-6 tiles + thumbnail), or a fixed-size CLIP/SigLIP processor
            (`build_fixed_size_image_processor`). Its tile size must match the vision tower's `image_size`.
        tokenizer: the language model's tokenizer; it must hold `<IMG_CONTEXT>` (and, when images are wrapped,
            `<img>` and `</img>`) as single tokens (see `add_image_tokens`). Its `padding_side` is used as set (left
            for generation, right for training) and its `model_max_length` bounds the expanded prompts.
        image_seq_length: vision tokens per tile; must equal the model's `config.image_seq_length` (256 for the
            published models, 144 for Xmodel-VLM).
        chat_template: a Jinja chat template (`chat_template_for(name_or_config)`; `CHAT_FORMATS` lists them);
            default: ChatML, the format of the Phantom family (Vicuna v1 for a fixed-size, LLaVA-style image
            processor). `from_config` picks the checkpoint's own (Phi-3's for Phantom-3.8B).
        wrap_image_tokens: put `<img>` ... `</img>` around each image's placeholders; default: True for a tiling
            image processor (Phantom, InternVL), False otherwise (LLaVA, Xmodel-VLM).
        add_special_tokens: default of the tokenizer's `add_special_tokens` when a call does not set it; None keeps
            the tokenizer's own default. False (what `phantom-hf convert` writes for published checkpoints) feeds
            the rendered prompt as it is, without a BOS token in front, so that the first token of the template is
            the Phantom anchor, as the published inference code tokenizes (`add_special_tokens=False`).
        multi_image_layout: "tiles" (each image tiled on its own, one `<image>` marker each) or "side_by_side"
            (the images of a prompt pasted into one, `paste_side_by_side`, then tiled: the published layout, which
            `phantom-hf convert` writes for published checkpoints). With "side_by_side" a prompt may hold one
            `<image>` marker for all its images (give them as one list per prompt) or one per image; the pasted
            image goes where the first marker is and the other markers are dropped.

    Calling it returns `input_ids`, `attention_mask` and, with images, `pixel_values` (all tiles of all images in
    prompt order, shape (num_tiles, 3, tile, tile)) and `num_patches` (tiles per image).
    """

    image_token = IMAGE_MARKER

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        image_seq_length: int = DEFAULT_IMAGE_SEQ_LENGTH,
        chat_template: str | None = None,
        wrap_image_tokens: bool | None = None,
        add_special_tokens: bool | None = None,
        multi_image_layout: str = "tiles",
    ) -> None:
        if tokenizer is None:
            raise ValueError("PhantomProcessor needs a tokenizer")
        if add_special_tokens is not None and not isinstance(add_special_tokens, bool):
            raise ValueError(f"add_special_tokens must be True, False or None, got {add_special_tokens!r}")
        if multi_image_layout not in MULTI_IMAGE_LAYOUTS:
            raise ValueError(f"multi_image_layout must be one of {MULTI_IMAGE_LAYOUTS}, got {multi_image_layout!r}")
        if image_processor is None:
            image_processor = build_image_processor()
        if isinstance(image_seq_length, bool) or not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"image_seq_length must be a positive int, got {image_seq_length!r}")
        if wrap_image_tokens is None:
            wrap_image_tokens = _is_tiling(image_processor)
        needed = IMAGE_TOKENS if wrap_image_tokens else (IMAGE_CONTEXT_TOKEN,)
        ids = {token: _single_token_id(tokenizer, token) for token in IMAGE_TOKENS}
        missing = [token for token in needed if ids[token] is None]
        if missing:
            raise ValueError(
                f"the tokenizer has no single token for {missing}; this processor needs {list(needed)}. Add them with "
                "`add_image_tokens(tokenizer, model)` (from processing_phantom, also `PhantomProcessor.add_image_tokens`),"
                " which also resizes the model's embeddings and sets config.image_token_id"
            )
        if chat_template is None:
            chat_template = CHATML_CHAT_TEMPLATE if wrap_image_tokens else VICUNA_V1_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        self.wrap_image_tokens = bool(wrap_image_tokens)
        self.add_special_tokens = add_special_tokens
        self.multi_image_layout = multi_image_layout
        self.image_start_token_id = ids[IMAGE_START_TOKEN] if wrap_image_tokens else None
        self.image_end_token_id = ids[IMAGE_END_TOKEN] if wrap_image_tokens else None
        self.image_token_id = ids[IMAGE_CONTEXT_TOKEN]
        self.image_token_ids = [self.image_token_id]
        if wrap_image_tokens:
            self.image_token_ids += [self.image_start_token_id, self.image_end_token_id]

    add_image_tokens = staticmethod(add_image_tokens)

    @classmethod
    def from_config(
        cls,
        config: Any,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        min_patches: int | None = None,
        max_patches: int | None = None,
        pad_to_square: bool | None = None,
        published_format: bool = False,
        multi_image_layout: str | None = None,
    ) -> "PhantomProcessor":
        """The processor matching a `PhantomConfig`: images prepared for its vision tower's type and `image_size`,
        `image_seq_length` from the config, the chat template of the model (`chat_template_for`, unless given).

        `published_format=True` (what `phantom-hf convert` uses for published Phantom checkpoints) feeds the model
        what the published inference code feeds it: the published chat template (`<image>` glued to the question),
        no special tokens added by the tokenizer (the template's first token is the anchor), and several images of
        a prompt pasted side by side into one. `multi_image_layout` ("tiles" or "side_by_side") overrides the layout
        this implies.

        InternViT (`internvl_vision`): dynamic tiling with `min_patches`..`max_patches` tiles (default 1..6),
        `<img>`/`</img>` around each image. CLIP and SigLIP: one image each, no wrapping; CLIP images are padded to
        a square first unless `pad_to_square=False` (LLaVA-1.5 / Xmodel-VLM "pad"). Checks that the tokenizer's
        `<IMG_CONTEXT>` id is `config.image_token_id`. When the tokenizer has no `model_max_length`, it is set to
        the decoder's `max_position_embeddings`.
        """
        vision_type = config.vision_config.model_type
        image_size = config.vision_config.image_size
        tile_size = image_size if isinstance(image_size, int) else int(image_size[0])
        if not isinstance(image_size, int) and int(image_size[0]) != int(image_size[1]):
            raise ValueError(f"Phantom tiles are square; vision_config.image_size is {image_size}")
        if vision_type in TILING_VISION_MODEL_TYPES:
            if pad_to_square is not None:
                raise ValueError(f"pad_to_square is for fixed-size (CLIP) towers; {vision_type} images are tiled")
            image_processor = build_image_processor(
                tile_size,
                DEFAULT_MIN_PATCHES if min_patches is None else min_patches,
                DEFAULT_MAX_PATCHES if max_patches is None else max_patches,
            )
        elif vision_type in FIXED_SIZE_VISION_MODEL_TYPES:
            if min_patches is not None or max_patches is not None:
                raise ValueError(f"min_patches/max_patches set tiling; a {vision_type} tower takes one image, not tiles")
            if pad_to_square is None:
                pad_to_square = vision_type == "clip_vision_model"
            image_processor = build_fixed_size_image_processor(vision_type, tile_size, pad_to_square)
        else:
            raise ValueError(
                f"PhantomProcessor.from_config knows the image preparation of {TILING_VISION_MODEL_TYPES + FIXED_SIZE_VISION_MODEL_TYPES}"
                f" towers, not {vision_type!r}; build PhantomProcessor(image_processor=..., tokenizer=...) directly"
            )
        context_id = _single_token_id(tokenizer, IMAGE_CONTEXT_TOKEN)
        if context_id is not None and config.image_token_id is not None and context_id != config.image_token_id:
            raise ValueError(
                f"the tokenizer's {IMAGE_CONTEXT_TOKEN} id is {context_id} but config.image_token_id is "
                f"{config.image_token_id}; they must agree (add_image_tokens(tokenizer, model) sets the config)"
            )
        max_positions = getattr(config.get_text_config(), "max_position_embeddings", None)
        if max_positions and tokenizer.model_max_length >= VERY_LARGE_INTEGER:
            tokenizer.model_max_length = max_positions
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_length=config.image_seq_length,
            chat_template=chat_template if chat_template is not None else chat_template_for(config, published_format),
            wrap_image_tokens=vision_type in TILING_VISION_MODEL_TYPES,
            add_special_tokens=False if published_format else None,
            multi_image_layout=multi_image_layout or ("side_by_side" if published_format else "tiles"),
        )

    @property
    def tile_size(self) -> int:
        """Side of a square tile in pixels (the vision tower's `image_size`)."""
        processor = self.image_processor
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        return int(size["height"])

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + ["pixel_values", "num_patches"]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        tiles = int(image_inputs["num_patches"][image_idx])
        placeholders = IMAGE_CONTEXT_TOKEN * (self.image_seq_length * tiles)
        return IMAGE_START_TOKEN + placeholders + IMAGE_END_TOKEN if self.wrap_image_tokens else placeholders

    def _images_per_prompt(self, images: Any, text: list[str]) -> list[list[Any]]:
        """`images` (one image, a flat list in marker order, or one list per prompt) as one list per prompt, after
        checking them against the `<image>` markers: one image per marker, or with `multi_image_layout=
        "side_by_side"` also several images for a prompt's single marker."""
        markers = [unmarked(sample).count(IMAGE_MARKER) for sample in text]
        side_by_side = self.multi_image_layout == "side_by_side"
        if images is None:
            if any(markers):
                raise ValueError(
                    f"the prompts have {sum(markers)} {IMAGE_MARKER} markers (per prompt: {markers}) but no images were given"
                )
            return [[] for _ in text]
        if not isinstance(images, (list, tuple)):
            images = [images]
        nested = [isinstance(item, (list, tuple)) for item in images]
        if images and all(nested):
            if len(images) != len(text):
                raise ValueError(f"images were given as {len(images)} lists (one per prompt) for {len(text)} prompts")
            for index, (row, count) in enumerate(zip(images, markers)):
                if len(row) != count and not (side_by_side and count == 1 and row):
                    raise ValueError(
                        f"prompt {index} has {count} {IMAGE_MARKER} marker(s) but {len(row)} image(s) were given for it"
                    )
            return [list(row) for row in images]
        if any(nested):
            raise TypeError("images must be one image, a flat list of images, or one list of images per prompt, not a mix")
        if side_by_side and len(text) == 1 and markers[0] == 1 and images:
            return [list(images)]
        if len(images) != sum(markers):
            raise ValueError(
                f"the prompts have {sum(markers)} {IMAGE_MARKER} marker(s) (per prompt: {markers}) but "
                f"{len(images)} image(s) were given; put one {IMAGE_MARKER} where each image goes"
            )
        rows, start = [], 0
        for count in markers:
            rows.append(list(images[start : start + count]))
            start += count
        return rows

    def user_prompt(self, text: str, images: int = 0) -> str:
        """`text` as a question to the model: one user turn holding `images` image blocks and then `text`, followed
        by the assistant's generation prompt, rendered by the chat template (so the image markers are written as
        the model's format writes them). Without a chat template: `<image>` + newline per image, then `text`."""
        if not self.chat_template:
            return (IMAGE_MARKER + "\n") * images + text
        content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        return self.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        """transformers' `apply_chat_template`; refuses `return_assistant_tokens_mask` on a chat with images before
        transformers 5.23, whose releases place the mask by the text before image placeholders are expanded."""
        if (
            kwargs.get("return_assistant_tokens_mask")
            and not ASSISTANT_MASK_FOLLOWS_EXPANSION
            and _chat_has_images(conversation)
        ):
            raise ValueError(
                "return_assistant_tokens_mask with PhantomProcessor needs transformers >= 5.23: earlier releases "
                "misplace the mask once <image> markers are expanded. Upgrade transformers, or mask with the labels"
            )
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    def __call__(self, images: Any = None, text: str | list[str] | None = None, **kwargs: Any) -> BatchFeature:
        """Tile the images, expand the `<image>` markers of `text` and tokenize.

        `images`: one image, a flat list in marker order, or one list per prompt; each a PIL image, numpy array or
        torch tensor ((H, W), (H, W, C) or (C, H, W)), a local path, an http(s) URL or encoded bytes. Keyword
        arguments go to the tokenizer and image processor as in any transformers processor (`padding`,
        `return_tensors`, `max_patches`, ...).
        """
        if text is None:
            raise ValueError("PhantomProcessor needs text: a prompt with one <image> marker per image")
        text = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(sample, str) for sample in text):
            raise TypeError("text must be a string or a list of strings")
        rows, index = [], 0
        for row in self._images_per_prompt(images, text):
            rows.append([_to_rgb_array(image, index + offset) for offset, image in enumerate(row)])
            index += len(row)
        if self.multi_image_layout == "side_by_side":
            flat_images = [paste_side_by_side(row) for row in rows if row]
        else:
            flat_images = [image for row in rows for image in row]

        merged = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = merged["text_kwargs"]
        if self.add_special_tokens is not None:
            text_kwargs.setdefault("add_special_tokens", self.add_special_tokens)
        return_tensors = text_kwargs.pop("return_tensors", None)
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", merged.get("return_mm_token_type_ids", False))
        return_offsets = text_kwargs.pop("return_text_replacement_offsets", merged.get("return_text_replacement_offsets", False))

        data: dict[str, Any] = {}
        replacements: list[str] = []
        if flat_images:
            images_kwargs = {**merged["images_kwargs"], "return_tensors": return_tensors}
            images_kwargs["input_data_format"] = ChannelDimension.LAST
            processed = self.image_processor(flat_images, **images_kwargs)
            if "num_patches" not in processed:  # a fixed-size image processor: one tile per image
                ones = [1] * len(flat_images)
                processed["num_patches"] = torch.tensor(ones) if return_tensors == "pt" else ones
            data["pixel_values"] = processed["pixel_values"]
            data["num_patches"] = processed["num_patches"]
            replacements = [self.replace_image_token(processed, index) for index in range(len(flat_images))]
            if self.multi_image_layout == "side_by_side":  # a prompt's pasted image at its first marker, no others
                pasted = iter(replacements)
                replacements = []
                for row, sample in zip(rows, text):
                    if row:
                        replacements += [next(pasted)] + [""] * (unmarked(sample).count(IMAGE_MARKER) - 1)
        expanded, offsets = self.get_text_with_replacements(text, replacements)

        encoding = self._tokenize(expanded, text_kwargs, return_tensors)
        if return_offsets:
            encoding["text_replacement_offsets"] = offsets
        if return_mm_token_type_ids:
            encoding["mm_token_type_ids"] = self.create_mm_token_type_ids(encoding["input_ids"])
        data = {**encoding, **data}
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _tokenize(self, text: list[str], text_kwargs: dict[str, Any], return_tensors: Any) -> dict[str, Any]:
        """Tokenize expanded prompts; a prompt longer than the maximum length is an error when it holds image
        placeholders (truncating it would cut an image) or when truncation was not asked for."""
        truncation = text_kwargs.get("truncation")
        truncate = truncation not in (None, False, "do_not_truncate")
        model_max_length = self.tokenizer.model_max_length
        limit = text_kwargs.get("max_length") if truncate else None
        if limit is None and model_max_length < VERY_LARGE_INTEGER:
            limit = model_max_length
        untruncated = {**text_kwargs, "truncation": False}
        encoding = self.tokenizer(text, return_tensors=return_tensors, **untruncated)
        if limit is None:
            return encoding
        mask = encoding.get("attention_mask")
        rows = mask if mask is not None else encoding["input_ids"]
        lengths = [int(sum(row)) if mask is not None else len(row) for row in rows]
        needs_truncation = False
        for index, (sample, length) in enumerate(zip(text, lengths)):
            if length <= limit:
                continue
            placeholders = sample.count(IMAGE_CONTEXT_TOKEN)
            if placeholders or not truncate:
                images = sample.count(IMAGE_START_TOKEN) if self.wrap_image_tokens else placeholders // self.image_seq_length
                raise ValueError(
                    f"prompt {index} is {length} tokens long after expanding its {images} image tile(s) into {placeholders} "
                    f"{IMAGE_CONTEXT_TOKEN} placeholders: {length - limit} more than the maximum length {limit}. "
                    "Use fewer or smaller images (max_patches), a shorter prompt, or a larger max_length"
                )
            needs_truncation = True
        if needs_truncation:
            encoding = self.tokenizer(text, return_tensors=return_tensors, **text_kwargs)
        return encoding

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Save `processor_config.json`, the tokenizer files, `chat_template.jinja`, this file (remote code) and
        `preprocessor_config.json` (the image processor alone, for loaders that read only that file)."""
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        files += self.image_processor.save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        return files

    def batch_decode(
        self, sequences: Any, skip_special_tokens: bool = True, prompt_ids: Any = None, **kwargs: Any
    ) -> list[str]:
        """Decode generated ids, skipping special tokens (image placeholders, turn markers) by default.

        With `prompt_ids` (the `input_ids` given to `generate`), the prompt is cut off each row first, leaving
        only the answer.
        """
        if prompt_ids is not None:
            sequences = [row[len(prompt) :] for row, prompt in zip(sequences, prompt_ids)]
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs: Any) -> MultiModalData:
        """Placeholder tokens (including `<img>` and `</img>` when wrapped) and tiles for images of the given
        (height, width)."""
        vision_data = {}
        if image_sizes is not None:
            if _is_tiling(self.image_processor):
                images_kwargs = self._merge_kwargs(self.valid_processor_kwargs, **kwargs)["images_kwargs"]
                tiles = [self.image_processor.get_number_of_image_patches(*size, images_kwargs) for size in image_sizes]
            else:
                tiles = [1] * len(image_sizes)
            wrap = 2 if self.wrap_image_tokens else 0
            vision_data["num_image_tokens"] = [wrap + self.image_seq_length * count for count in tiles]
            vision_data["num_image_patches"] = tiles
        return MultiModalData(**vision_data)


PhantomProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "CHATML_CHAT_TEMPLATE",
    "CHAT_FORMATS",
    "IMAGE_CONTEXT_TOKEN",
    "IMAGE_END_TOKEN",
    "IMAGE_MARKER",
    "IMAGE_START_TOKEN",
    "MULTI_IMAGE_LAYOUTS",
    "PHI3_CHAT_TEMPLATE",
    "VICUNA_V1_CHAT_TEMPLATE",
    "PhantomProcessor",
    "add_image_tokens",
    "build_fixed_size_image_processor",
    "build_image_processor",
    "chat_format_for",
    "chat_template_for",
    "paste_side_by_side",
    "to_rgb_array",
]
