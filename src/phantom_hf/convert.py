"""Conversion of the published Phantom checkpoints (and LLaVA-style ones) to Hub-native folders.

`convert_checkpoint(src, dst)` reads a checkpoint folder (safetensors or `.bin`, sharded or not), renames every
tensor to this package's layout, splits the packed projections our modules keep apart (InternViT `attn.qkv`,
InternLM2 `wqkv`), and writes a folder that `AutoModelForImageTextToText.from_pretrained(dst,
trust_remote_code=True)` loads: config.json with `auto_map`, the remote-code files, sharded safetensors weights,
generation config, and the processor (tokenizer, image tiling, chat template).

Each checkpoint layout is one `SourceLayout` object in `SOURCES` (its config, tokenizer, tensor names and
processor); the pipeline of `convert_checkpoint` is the same for all:

- "phantom" (`PublishedPhantomLayout`): the published Phantom checkpoints (github ByungKwanLee/Phantom). Their
  processor feeds the model what the published inference code feeds it (`PhantomProcessor.from_config(...,
  published_format=True)`: the published prompt, no BOS token, several images side by side); a Phi-3 sliding
  window is written as transformers counts it (`published_sliding_window`); a tokenizer that needs the
  checkpoint's own code (InternLM2) is rebuilt as a fast tokenizer (`load_tokenizer`).
- "llava" (`LlavaLayout`): LLaVA-1.5 and Xmodel-VLM: `model.mm_projector.*`,
  `model.vision_tower.vision_tower.vision_model.*`, `model.layers.*`, `model.embed_tokens`, `model.norm`,
  `lm_head`, and a config.json with the Llama fields and `mm_*` settings. The image placeholder `<IMG_CONTEXT>` is
  added to the tokenizer; when its id lies beyond the embedding (LLaVA splices image features in at id -200 and
  has no such token), the embedding and the head grow by that one row, set to the mean of the others (the
  placeholder's embedding is always replaced by vision tokens; its logit is the mean logit).

Everything is checked before anything is written: names and shapes come from the files' headers and from the
target model built on the meta device. A source tensor without a target, a target left unfilled, or a shape
that disagrees stops the conversion with a `ValueError` listing them, and the destination is left as it was
(absent or empty). Tensors are then streamed one at a time into shards of at most `max_shard_size` bytes, so
memory stays below one copy of the weights, into a hidden staging folder beside the destination that becomes the
destination in one rename once complete (`write_folder`, the writer `save_pretrained` uses too).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .modeling import PhantomConfig, PhantomForConditionalGeneration
from .modeling.folder_phantom import check_new_or_empty, write_folder
from .modeling.modeling_phantom import save_remote_code
from .modeling.processing_phantom import (
    chat_template_for,
    IMAGE_CONTEXT_TOKEN,
    IMAGE_TOKENS,
    PhantomProcessor,
    add_image_tokens,
)
from .modeling.presets_phantom import ALL_PRESET_NAMES, BASELINE_PRESET_NAMES, BASELINE_PRESETS, PRESET_NAMES, PRESETS
from .spm_tokenizer import fast_tokenizer_from_sentencepiece, special_tokens_of

logger = logging.getLogger(__name__)

# Tokenizer files copied verbatim when the tokenizer cannot be loaded without running the checkpoint's own code.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)

# Buffers that older transformers versions saved although they are derived from the config.
IGNORED_SOURCE_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$|\.embeddings\.position_ids$")

# safetensors dtype codes and the torch dtypes they load as (those this torch has).
_SAFETENSORS_DTYPES = {
    code: getattr(torch, name)
    for code, name in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2", "float8_e5m2"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"), ("C64", "complex64"),
    )
    if hasattr(torch, name)
}  # fmt: skip


def read_json_file(path: Path, what: str = "") -> dict[str, Any]:
    """The JSON object in file `path`; `ValueError` naming the file when it is not valid JSON or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON{what}: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object{what}, got {type(value).__name__}")
    return value


# Keys of a published `llm_config` / `vision_config` that describe the old runtime, not the architecture.
_RUNTIME_KEYS = {
    "architectures",
    "auto_map",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "attn_implementation",
    "_attn_implementation",
    "use_flash_attn",
    "model_type",
}


# ---------------------------------------------------------------------------------------------------
# Reading the published folder
# ---------------------------------------------------------------------------------------------------


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint folder: names, shapes and dtypes without loading data.

    Reads `model.safetensors.index.json` / `pytorch_model.bin.index.json` when present, otherwise every
    `*.safetensors` file, otherwise every `pytorch_model*.bin` / `model*.bin` file. `.bin` files are opened with
    `torch.load(weights_only=True, mmap=True)`, so their tensors stay on disk until read.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"checkpoint folder {str(self.folder)!r} does not exist or is not a folder")
        self.files = self._weight_files()
        self._locations: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        for path in self.files:
            for name, shape, dtype in self._header(path):
                if name in self._locations:
                    raise ValueError(f"tensor {name!r} is stored twice: in {self._locations[name].name} and {path.name}")
                self._locations[name], self._shapes[name], self._dtypes[name] = path, shape, dtype

    def _weight_files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                weight_map = read_json_file(index).get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
                    raise ValueError(f"{index} has no weight_map (an object of tensor name -> shard file)")
                files = [self.folder / name for name in dict.fromkeys(weight_map.values())]
                missing = [str(path.name) for path in files if not path.is_file()]
                if missing:
                    raise ValueError(f"{index_name} lists shard files that are not in the folder: {missing}")
                return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            files = sorted({*self.folder.glob("pytorch_model*.bin"), *self.folder.glob("model*.bin")})
        if not files:
            raise ValueError(f"no weights in {str(self.folder)!r}: expected *.safetensors or pytorch_model*.bin files")
        return files

    def _describe(self, path: Path) -> str:
        """`path` as errors name it: the file, and which of the checkpoint's weight files it is."""
        position = self.files.index(path) + 1 if path in self.files else 0
        return f"{path} (weight file {position} of {len(self.files)})" if position else str(path)

    def _header(self, path: Path) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, framework="pt") as handle:
                    entries = [(name, handle.get_slice(name)) for name in handle.keys()]
                    entries = [(name, tuple(item.get_shape()), item.get_dtype()) for name, item in entries]
            except (SafetensorError, OSError) as error:
                raise ValueError(
                    f"{self._describe(path)} cannot be read ({error}): it is empty, truncated or not a safetensors file"
                ) from error
            for name, shape, code in entries:
                if code not in _SAFETENSORS_DTYPES:
                    raise ValueError(
                        f"{self._describe(path)}: tensor {name!r} has dtype {code}, which torch {torch.__version__} "
                        f"cannot hold; readable: {', '.join(_SAFETENSORS_DTYPES)}"
                    )
                yield name, shape, _SAFETENSORS_DTYPES[code]
        else:
            for name, tensor in self._load_bin(path).items():
                yield name, tuple(tensor.shape), tensor.dtype

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is not None and self._bin_cache[0] == path:
            return self._bin_cache[1]
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{self._describe(path)} was refused as unsafe: it is not a plain pickle of tensors, and loading it "
                "would run the code it carries. Re-save its tensors as safetensors where you trust the file"
            ) from error
        except (RuntimeError, EOFError, OSError, ValueError) as error:
            raise ValueError(f"{self._describe(path)} cannot be read ({error}): it is truncated or not a torch checkpoint") from error
        if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise ValueError(f"{self._describe(path)} does not hold a flat state dict of tensors")
        self._bin_cache = (path, state)
        return state

    def names(self) -> list[str]:
        """Tensor names, grouped by file (the order in which `load` reads them most cheaply)."""
        return list(self._locations)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def file(self, name: str) -> Path:
        """The weight file holding tensor `name`."""
        return self._locations[name]

    def load(self, name: str) -> torch.Tensor:
        """One tensor, read from disk."""
        path = self._locations[name]
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, framework="pt") as handle:
                    return handle.get_tensor(name)
            except (SafetensorError, OSError, KeyError, TypeError) as error:
                raise ValueError(f"{self._describe(path)}: tensor {name!r} ({self._dtypes[name]}) cannot be read ({error!r})") from error
        return self._load_bin(path)[name]

    def release(self) -> None:
        """Drop the memory map of the last `.bin` file read."""
        self._bin_cache = None


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


def _published_text_config(llm_config: dict[str, Any]) -> dict[str, Any]:
    """Text sub-config (as a dict with `model_type`) of a published `llm_config`; InternLM2 becomes Llama."""
    architecture = (llm_config.get("architectures") or [None])[0]
    values = {key: value for key, value in llm_config.items() if key not in _RUNTIME_KEYS}
    if architecture == "InternLM2ForCausalLM":
        keep = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "initializer_range",
        )  # fmt: skip
        text = {key: values[key] for key in keep if key in values}
        text["attention_bias"] = bool(values.get("bias", False))
        text["model_type"] = "llama"
        return text
    model_types = {"Qwen2ForCausalLM": "qwen2", "Phi3ForCausalLM": "phi3", "LlamaForCausalLM": "llama"}
    if architecture not in model_types:
        raise ValueError(
            f"llm_config.architectures[0] is {architecture!r}; conversion knows "
            f"{['InternLM2ForCausalLM', *model_types]}"
        )
    values["model_type"] = model_types[architecture]
    if values["model_type"] == "phi3" and values.get("sliding_window") is not None:
        values["sliding_window"] = published_sliding_window(values["sliding_window"])
    scaling = values.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("type") == "su":  # Phi-3's old name of LongRoPE
        scaling = {**scaling, "type": "longrope"}
        scaling.setdefault("original_max_position_embeddings", values.get("original_max_position_embeddings"))
        values["rope_scaling"] = scaling
    return values


def published_sliding_window(window: int) -> int:
    """transformers' `sliding_window` for a published Phi-3 `sliding_window`: one more. The published Phi-3
    attention (github ByungKwanLee/Phantom, model/arch_3_8b/modeling_phi3.py, `flash_attn_func(...,
    window_size=(sliding_window, sliding_window))`, the implementation its loader selects) lets each token see
    itself and `sliding_window` tokens before it; transformers counts the token itself in `sliding_window` (its
    masks keep keys after `q - sliding_window`, its flash path passes `window_size=(w - 1, w - 1)`)."""
    return int(window) + 1


def _published_vision_config(vision_config: dict[str, Any], force_image_size: int | None) -> dict[str, Any]:
    """`InternVLVisionConfig` fields (with `model_type`) of a published InternViT `vision_config`."""
    keep = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
        "image_size", "patch_size", "hidden_act", "norm_type", "layer_norm_eps", "initializer_range",
    )  # fmt: skip
    vision = {key: vision_config[key] for key in keep if key in vision_config}
    vision["attention_bias"] = bool(vision_config.get("qkv_bias", True))
    vision["use_qk_norm"] = bool(vision_config.get("qk_normalization", False))
    vision["use_mean_pooling"] = True
    vision["model_type"] = "internvl_vision"
    if force_image_size:
        vision["image_size"] = force_image_size
    return vision


def config_from_published(published: dict[str, Any]) -> PhantomConfig:
    """`PhantomConfig` of a published checkpoint's config.json (keys `llm_config`, `vision_config`, ...)."""
    missing = [key for key in ("llm_config", "vision_config") if not isinstance(published.get(key), dict)]
    if missing:
        raise ValueError(f"the published config.json has no {missing}; pass --preset to name the size")
    text = _published_text_config(published["llm_config"])
    vision = _published_vision_config(published["vision_config"], published.get("force_image_size"))
    image_token_id = published.get("image_token_index", published.get("image_token_id"))
    return PhantomConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image_token_id,
        downsample_ratio=published.get("downsample_ratio", 0.5),
    )


_CHECKED_FIELDS = (
    ("text_config", "hidden_size"),
    ("text_config", "num_hidden_layers"),
    ("text_config", "num_attention_heads"),
    ("text_config", "num_key_value_heads"),
    ("text_config", "intermediate_size"),
    ("text_config", "model_type"),
    ("vision_config", "hidden_size"),
    ("vision_config", "num_hidden_layers"),
)


def _check_against_preset(config: PhantomConfig, preset: str) -> None:
    """Raise `ValueError` listing every `_CHECKED_FIELDS` value in which `config` differs from `preset`."""
    reference = PhantomConfig.from_preset(preset)
    disagreements = [
        f"{sub}.{field}: preset {getattr(getattr(reference, sub), field)!r}, checkpoint {getattr(getattr(config, sub), field)!r}"
        for sub, field in _CHECKED_FIELDS
        if getattr(getattr(reference, sub), field) != getattr(getattr(config, sub), field)
    ]
    if disagreements:
        raise ValueError(f"the checkpoint is not a {preset}: " + "; ".join(disagreements))


def resolve_config(src: str | Path, preset: str | None = None) -> PhantomConfig:
    """The target config of a conversion: from the published config.json when there is one (the preset, if
    given, must then agree with it), otherwise from the preset."""
    if preset in BASELINE_PRESETS:
        raise ValueError(f"{preset!r} is a LLaVA-style baseline, not a Phantom checkpoint; convert it with source='llava'")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown Phantom preset {preset!r}; known presets: {', '.join(PRESET_NAMES)}")
    config_path = Path(src) / "config.json"
    published = read_json_file(config_path) if config_path.is_file() else None
    if published is None or "llm_config" not in published:
        if preset is None:
            raise ValueError(
                f"{str(src)!r} has no published config.json with llm_config/vision_config; "
                f"pass preset= one of {', '.join(PRESET_NAMES)}"
            )
        return PhantomConfig.from_preset(preset)
    config = config_from_published(published)
    if preset is not None:
        _check_against_preset(config, preset)
    return config


# ---------------------------------------------------------------------------------------------------
# Name mapping (the published layout: docs/design.md, section 5)
# ---------------------------------------------------------------------------------------------------

# (pattern on the published name, replacement), applied in order; the first match wins.
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        # InternViT -> InternVLVisionModel
        (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
        (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
        (r"^vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", r"model.vision_tower.encoder.layer.\1.attention.projection_layer."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.", r"model.vision_tower.encoder.layer.\1.attention.\2."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
        (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"model.vision_tower.encoder.layer.\1.lambda_1"),
        (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"model.vision_tower.encoder.layer.\1.lambda_2"),
        # projector (InternVL names it mlp1)
        (r"^(?:vision_proj|mlp1)\.0\.", "model.multi_modal_projector.layer_norm."),
        (r"^(?:vision_proj|mlp1)\.1\.", "model.multi_modal_projector.linear_1."),
        (r"^(?:vision_proj|mlp1)\.3\.", "model.multi_modal_projector.linear_2."),
        # language model head
        (r"^language_model\.(?:lm_head|output)\.weight$", "lm_head.weight"),
        # InternLM2 -> Llama
        (r"^language_model\.model\.tok_embeddings\.", "model.language_model.embed_tokens."),
        (r"^language_model\.model\.layers\.(\d+)\.attention\.wo\.", r"model.language_model.layers.\1.self_attn.o_proj."),
        (r"^language_model\.model\.layers\.(\d+)\.attention\.", r"model.language_model.layers.\1.self_attn."),
        (r"^language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.", r"model.language_model.layers.\1.mlp.gate_proj."),
        (r"^language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.", r"model.language_model.layers.\1.mlp.up_proj."),
        (r"^language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.", r"model.language_model.layers.\1.mlp.down_proj."),
        (r"^language_model\.model\.layers\.(\d+)\.attention_norm\.", r"model.language_model.layers.\1.input_layernorm."),
        (r"^language_model\.model\.layers\.(\d+)\.ffn_norm\.", r"model.language_model.layers.\1.post_attention_layernorm."),
        # Qwen2, Phi-3, Llama: same names one level down
        (r"^language_model\.model\.", "model.language_model."),
    )
)
_VISION_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_INTERNLM2_WQKV = re.compile(r"^language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)$")


@dataclass(frozen=True)
class TensorRule:
    """How one published tensor becomes one or more target tensors: `split` cuts it along dim 0 (None: copy);
    with `grow_rows`, `split` instead appends that many rows (the source has that many fewer than the target)."""

    source: str
    targets: tuple[str, ...]
    split: Callable[[torch.Tensor], list[torch.Tensor]] | None = None
    grow_rows: int = 0


def _split_wqkv(num_heads: int, num_kv_heads: int, head_dim: int) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """InternLM2's `wqkv` rows are, per key/value group g: [q_(g,0) … q_(g,r-1), k_g, v_g] (docs/design.md, section 5)."""
    group = num_heads // num_kv_heads

    def split(tensor: torch.Tensor) -> list[torch.Tensor]:
        rest = tensor.shape[1:]
        grouped = tensor.reshape(num_kv_heads, group + 2, head_dim, *rest)
        query = grouped[:, :group].reshape(num_heads * head_dim, *rest)
        key = grouped[:, group].reshape(num_kv_heads * head_dim, *rest)
        value = grouped[:, group + 1].reshape(num_kv_heads * head_dim, *rest)
        return [query, key, value]

    return split


def _split_thirds(tensor: torch.Tensor) -> list[torch.Tensor]:
    return list(tensor.chunk(3, dim=0))


def map_published_name(name: str, config: PhantomConfig) -> TensorRule | None:
    """The rule that turns published tensor `name` into our tensor(s), or None when no rule applies."""
    match = _VISION_QKV.match(name)
    if match:
        prefix = f"model.vision_tower.encoder.layer.{match[1]}.attention"
        return TensorRule(name, tuple(f"{prefix}.{p}_proj.{match[2]}" for p in "qkv"), _split_thirds)
    match = _INTERNLM2_WQKV.match(name)
    if match:
        text = config.text_config
        prefix = f"model.language_model.layers.{match[1]}.self_attn"
        split = _split_wqkv(text.num_attention_heads, text.num_key_value_heads, config.phantom_head_dim)
        return TensorRule(name, tuple(f"{prefix}.{p}_proj.{match[2]}" for p in "qkv"), split)
    for pattern, replacement in _RENAMES:
        if pattern.search(name):
            return TensorRule(name, (pattern.sub(replacement, name, count=1),))
    return None


_LLAVA_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        # LLaVA-1.5 names mlp2x_gelu `mm_projector.{0,2}`, Xmodel-VLM names XDP `mm_projector.mlp.{0,2}`
        (r"^model\.mm_projector\.(?:mlp\.)?0\.", "model.multi_modal_projector.linear_1."),
        (r"^model\.mm_projector\.(?:mlp\.)?2\.", "model.multi_modal_projector.linear_2."),
        (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
        (r"^lm_head\.weight$", "lm_head.weight"),
    )
)
_LLAVA_VISION = re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.")
_LLAVA_GROWN = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def _append_mean_rows(count: int) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    def grow(tensor: torch.Tensor) -> list[torch.Tensor]:
        mean = tensor.double().mean(0, keepdim=True).to(tensor.dtype)
        return [torch.cat([tensor, mean.expand(count, -1)])]

    return grow


def map_llava_name(name: str, vision_prefix: str, grow_rows: int = 0) -> TensorRule | None:
    """The rule for tensor `name` of a LLaVA-style checkpoint, or None when no rule applies.

    `vision_prefix` is where the vision model's own names start in our model ("model.vision_tower." with
    transformers 5, whose CLIP/SigLIP vision models dropped the `vision_model.` level). The embedding and the head
    get `grow_rows` mean rows appended.
    """
    if _LLAVA_VISION.search(name):
        return TensorRule(name, (_LLAVA_VISION.sub(vision_prefix, name, count=1),))
    for pattern, replacement in _LLAVA_RENAMES:
        if pattern.search(name):
            target = pattern.sub(replacement, name, count=1)
            if grow_rows and target in _LLAVA_GROWN:
                return TensorRule(name, (target,), _append_mean_rows(grow_rows), grow_rows)
            return TensorRule(name, (target,))
    return None


# LLaVA `mm_projector_type` -> our `projector_type` (Xmodel-VLM's "xdpnet" / "xdpnetv10_<factor>" is XDP).
_LLAVA_PROJECTORS = {"mlp2x_gelu": "mlp2x_gelu", "xdpnet": "xdp"}
_LLAVA_SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}
_LLAVA_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
    "initializer_range",
)  # fmt: skip
# Vision towers a LLaVA config.json names only by their Hub id (`mm_vision_tower`).
_KNOWN_LLAVA_TOWERS = {"clip-vit-large-patch14-336": "xmodel-vlm-1.1b"}


def _llava_vision_config(llava: dict[str, Any]) -> dict[str, Any]:
    if isinstance(llava.get("vision_config"), dict):
        vision = {key: value for key, value in llava["vision_config"].items() if key not in _RUNTIME_KEYS - {"model_type"}}
        vision.setdefault("model_type", "clip_vision_model")
        return vision
    tower = str(llava.get("mm_vision_tower") or llava.get("vision_tower") or "")
    for suffix, preset in _KNOWN_LLAVA_TOWERS.items():
        if tower.rstrip("/").endswith(suffix):
            return copy.deepcopy(BASELINE_PRESETS[preset]["vision_config"])
    raise ValueError(
        f"config.json names the vision tower {tower!r}, whose dimensions are not known here; add a `vision_config` "
        f"dict (CLIPVisionConfig fields) to config.json or pass preset= one of {', '.join(BASELINE_PRESET_NAMES)}"
    )


def config_from_llava(llava: dict[str, Any]) -> PhantomConfig:
    """`PhantomConfig` (no Phantom Dimension) of a LLaVA-style config.json: Llama fields at the top level, the
    vision tower from `vision_config` or a known `mm_vision_tower`, `mm_projector_type`, `mm_vision_select_layer`,
    `mm_vision_select_feature`. The XDP group size is read from the weights later (`plan_conversion`)."""
    if llava.get("mm_use_im_start_end"):
        raise ValueError("mm_use_im_start_end=True (image start/end tokens around the placeholder) is not supported")
    projector = str(llava.get("mm_projector_type", "linear"))
    projector_type = "xdp" if re.fullmatch(r"xdpnet(v10_\d+)?", projector) else _LLAVA_PROJECTORS.get(projector)
    if projector_type is None:
        raise ValueError(f"mm_projector_type {projector!r} is not supported; known: mlp2x_gelu, xdpnet")
    select = llava.get("mm_vision_select_feature", "patch")
    if select not in _LLAVA_SELECT_FEATURES:
        raise ValueError(f"mm_vision_select_feature {select!r} is not supported; known: {list(_LLAVA_SELECT_FEATURES)}")
    vision = _llava_vision_config(llava)
    if llava.get("mm_hidden_size") not in (None, vision.get("hidden_size")):
        raise ValueError(f"mm_hidden_size {llava['mm_hidden_size']} differs from the vision tower's {vision.get('hidden_size')}")
    text = {key: llava[key] for key in _LLAVA_TEXT_KEYS if key in llava}
    text["model_type"] = "llama"
    return PhantomConfig(
        text_config=text,
        vision_config=vision,
        projector_type=projector_type,
        vision_feature_layer=int(llava.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=_LLAVA_SELECT_FEATURES[select],
        phantom_dimension=False,
    )


def resolve_llava_config(src: str | Path, preset: str | None = None) -> PhantomConfig:
    """The target config of a LLaVA-style conversion: from config.json (checked against the preset when both are
    there) or from a baseline preset ("xmodel-vlm-1.1b")."""
    if preset is not None and preset not in BASELINE_PRESETS:
        raise ValueError(
            f"preset {preset!r} is not a LLaVA-style baseline; known: {', '.join(BASELINE_PRESET_NAMES)} "
            "(Phantom presets convert with source='phantom')"
        )
    config_path = Path(src) / "config.json"
    if not config_path.is_file():
        if preset is None:
            raise ValueError(f"{str(src)!r} has no config.json; pass preset= one of {', '.join(BASELINE_PRESET_NAMES)}")
        return PhantomConfig.from_preset(preset)
    config = config_from_llava(read_json_file(config_path))
    if preset is not None:
        _check_against_preset(config, preset)
    return config


# ---------------------------------------------------------------------------------------------------
# Plan and checks
# ---------------------------------------------------------------------------------------------------


@dataclass
class ConversionPlan:
    """What a conversion will do, checked before anything is written."""

    config: PhantomConfig
    rules: list[TensorRule]
    target_shapes: dict[str, tuple[int, ...]]
    ignored: list[str]


def _expected_target_shapes(config: PhantomConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors our model stores (tied copies excluded), from a meta-device model."""
    with torch.device("meta"):
        model = PhantomForConditionalGeneration(config)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if config.tie_word_embeddings else set()
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if name not in tied}


def _vision_prefix(expected: dict[str, tuple[int, ...]]) -> str:
    """Where the vision model's own tensor names start in our model (its `vision_model.` level, if it has one)."""
    nested = any(name.startswith("model.vision_tower.vision_model.") for name in expected)
    return "model.vision_tower.vision_model." if nested else "model.vision_tower."


def plan_conversion(
    reader: CheckpointReader, config: PhantomConfig, source: str = "phantom", grow_rows: int = 0
) -> ConversionPlan:
    """Map every source tensor and check names and shapes; `ValueError` listing every problem found.

    `source`: "phantom" or "llava" (`SOURCES`); for "llava" `grow_rows` rows are appended to the embedding and
    head. The config is first fitted to the weights (`SourceLayout.fit_config`).
    """
    layout = source_layout(source)
    names = reader.names()
    layout.fit_config(reader, config)
    expected = _expected_target_shapes(config)
    vision_prefix = _vision_prefix(expected)

    rules, ignored, unmapped, mismatched, produced, integers = [], [], [], [], {}, []
    for name in names:
        rule = layout.map_name(name, config, vision_prefix, grow_rows)
        if rule is None or any(target not in expected for target in rule.targets):
            if IGNORED_SOURCE_TENSORS.search(name):
                ignored.append(name)
            else:
                unmapped.append(name if rule is None else f"{name} (-> {', '.join(rule.targets)})")
            continue
        target_shapes = [expected[target] for target in rule.targets]
        if rule.grow_rows:
            want = (target_shapes[0][0] - rule.grow_rows, *target_shapes[0][1:])
        elif rule.split is None:
            want = target_shapes[0]
        elif all(shape[1:] == target_shapes[0][1:] for shape in target_shapes):
            want = (sum(shape[0] for shape in target_shapes), *target_shapes[0][1:])
        else:
            want = None
        if want is None or reader.shape(name) != want:
            mismatched.append(f"{name}: expected {want}, found {reader.shape(name)}")
        if not reader.dtype(name).is_floating_point:
            integers.append(f"{name}: {reader.dtype(name)} in {reader.file(name).name}")
        for target in rule.targets:
            if target in produced:
                unmapped.append(f"{name} (-> {target}, already filled from {produced[target]})")
            produced[target] = name
        rules.append(rule)
    unfilled = [target for target in expected if target not in produced]

    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} source tensor(s) without a target: " + "; ".join(unmapped))
    if unfilled:
        problems.append(f"{len(unfilled)} target tensor(s) left unfilled: " + "; ".join(unfilled))
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (name: expected, found): " + "; ".join(mismatched))
    if integers:
        problems.append(
            f"{len(integers)} weight(s) not floating-point (quantized or integer data; the model's weights are "
            "floating-point): " + "; ".join(integers)
        )
    if problems:
        raise ValueError(f"cannot convert {str(reader.folder)!r}; nothing was written.\n" + "\n".join(problems))
    return ConversionPlan(config=config, rules=rules, target_shapes=expected, ignored=ignored)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return int(float(match[1]) * units[match[2]])


def _target_dtype(source_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and source_dtype.is_floating_point else source_dtype


def _shard_assignment(
    plan: ConversionPlan, reader: CheckpointReader, dtype: torch.dtype | None, max_bytes: int
) -> list[int]:
    """Shard index of each rule, in rule order (a rule's targets stay together)."""
    shards, current, size = [], 0, 0
    for rule in plan.rules:
        itemsize = torch.empty((), dtype=_target_dtype(reader.dtype(rule.source), dtype)).element_size()
        nbytes = itemsize * sum(int(torch.Size(plan.target_shapes[t]).numel()) for t in rule.targets)
        if size and size + nbytes > max_bytes:
            current, size = current + 1, 0
        shards.append(current)
        size += nbytes
    return shards


def _write_weights(
    plan: ConversionPlan, reader: CheckpointReader, folder: Path, dtype: torch.dtype | None, max_bytes: int
) -> torch.dtype:
    """Stream the tensors into safetensors shards; returns the dtype most of the weights were written in."""
    assignment = _shard_assignment(plan, reader, dtype, max_bytes)
    count = assignment[-1] + 1
    file_name = (lambda i: "model.safetensors") if count == 1 else (lambda i: f"model-{i + 1:05d}-of-{count:05d}.safetensors")
    weight_map: dict[str, str] = {}
    bytes_per_dtype: dict[torch.dtype, int] = {}
    shard: dict[str, torch.Tensor] = {}
    total = 0
    for position, rule in enumerate(plan.rules):
        tensor = reader.load(rule.source)
        tensor = tensor.to(_target_dtype(tensor.dtype, dtype))
        parts = [tensor] if rule.split is None else rule.split(tensor)
        for target, part in zip(rule.targets, parts):
            shard[target] = part.contiguous().clone()
            weight_map[target] = file_name(assignment[position])
            nbytes = part.numel() * part.element_size()
            bytes_per_dtype[part.dtype] = bytes_per_dtype.get(part.dtype, 0) + nbytes
            total += nbytes
        del tensor, parts
        last_of_shard = position + 1 == len(plan.rules) or assignment[position + 1] != assignment[position]
        if last_of_shard:
            save_file(shard, folder / file_name(assignment[position]), metadata={"format": "pt"})
            shard = {}
    reader.release()
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return max(bytes_per_dtype, key=bytes_per_dtype.get)


def _needs_own_code(src: Path) -> bool:
    """Whether the folder's tokenizer class is the checkpoint's own code (`auto_map` in tokenizer_config.json)."""
    config_path = src / "tokenizer_config.json"
    config = read_json_file(config_path) if config_path.is_file() else {}
    return "AutoTokenizer" in (config.get("auto_map") or {})


def load_tokenizer(src: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    """The tokenizer of checkpoint folder `src`, as a fast tokenizer that loads without the checkpoint's code.

    A tokenizer transformers knows is loaded as it is. One that needs the checkpoint's own code (InternLM2's
    `tokenization_internlm2.py`) is rebuilt without it: from its `tokenizer.json`, or from its SentencePiece
    `tokenizer.model` (`spm_tokenizer.fast_tokenizer_from_sentencepiece`, no sentencepiece needed). Only when
    neither file is there does `trust_remote_code` load it with its code. None when nothing works.
    """
    src = Path(src)
    if not _needs_own_code(src):
        try:
            return AutoTokenizer.from_pretrained(src)
        except Exception as error:  # noqa: BLE001 - any failure means "try the files"
            logger.info("AutoTokenizer cannot load %s (%s); trying its files", src, error)
    if (src / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), **special_tokens_of(src))
    if (src / "tokenizer.model").is_file():
        return fast_tokenizer_from_sentencepiece(src)
    if trust_remote_code:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=True)
    return None


def _no_tokenizer_message(src: Path) -> str:
    return (
        f"the tokenizer in {str(src)!r} needs the checkpoint's own code and has neither a tokenizer.json nor a "
        "SentencePiece tokenizer.model to rebuild it from"
    )


class SourceLayout:
    """One checkpoint layout `convert_checkpoint` reads: how its config, tokenizer and tensor names become ours,
    and which processor the converted folder gets. `SOURCES` holds one object per layout; the pipeline in
    `convert_checkpoint` is the same for all."""

    name: str = ""
    kind: str = ""  # for the model card: "Converted ... from the {kind} ..."
    head_pattern: str = ""  # the stored LM head's name; without one the head is tied to the embedding

    def resolve_config(self, src: Path, preset: str | None) -> PhantomConfig:
        raise NotImplementedError

    def prepare_tokenizer(
        self, src: Path, reader: CheckpointReader, config: PhantomConfig, trust_remote_code: bool
    ) -> tuple[PreTrainedTokenizerBase | None, int]:
        """The tokenizer with the image tokens added (None when the folder has none usable) and how many rows the
        embedding must grow; sets `config.image_token_id` (and the vocabulary size where it grows)."""
        raise NotImplementedError

    def fit_config(self, reader: CheckpointReader, config: PhantomConfig) -> None:
        """Settle what the weights decide: a stored head is used as it is (untied)."""
        has_head = any(re.match(self.head_pattern, name) for name in reader.names())
        config.tie_word_embeddings = not has_head
        config.text_config.tie_word_embeddings = not has_head

    def map_name(self, name: str, config: PhantomConfig, vision_prefix: str, grow_rows: int) -> TensorRule | None:
        raise NotImplementedError

    def processor(self, src: Path, config: PhantomConfig, tokenizer: PreTrainedTokenizerBase, preset: str | None) -> PhantomProcessor:
        raise NotImplementedError


class PublishedPhantomLayout(SourceLayout):
    """The published Phantom checkpoints (github ByungKwanLee/Phantom; Hub BK-Lee/Phantom-*): `vision_model.*`,
    `vision_proj.*`, `language_model.*` in the backbone's own naming, config.json with `llm_config` and
    `vision_config`. The processor feeds the model as the published inference code does (`published_format`)."""

    name, kind = "phantom", "published Phantom checkpoint"
    head_pattern = r"^language_model\.(lm_head|output)\.weight$"

    def resolve_config(self, src: Path, preset: str | None) -> PhantomConfig:
        return resolve_config(src, preset)

    def prepare_tokenizer(
        self, src: Path, reader: CheckpointReader, config: PhantomConfig, trust_remote_code: bool
    ) -> tuple[PreTrainedTokenizerBase | None, int]:
        if not any((src / name).is_file() for name in TOKENIZER_FILES):
            return None, 0
        tokenizer = load_tokenizer(src, trust_remote_code)
        if tokenizer is None:
            return None, 0
        add_image_tokens(tokenizer)
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in IMAGE_TOKENS}
        too_large = {token: index for token, index in ids.items() if index >= config.text_config.vocab_size}
        if too_large:
            raise ValueError(
                f"the tokenizer gives {too_large}, beyond the embedding's {config.text_config.vocab_size} rows; "
                "these tokens need trained embeddings the checkpoint does not have"
            )
        config.image_token_id = ids[IMAGE_CONTEXT_TOKEN]
        return tokenizer, 0

    def map_name(self, name: str, config: PhantomConfig, vision_prefix: str, grow_rows: int) -> TensorRule | None:
        return map_published_name(name, config)

    def processor(self, src: Path, config: PhantomConfig, tokenizer: PreTrainedTokenizerBase, preset: str | None) -> PhantomProcessor:
        template = chat_template_for(preset or config, published=True)
        return PhantomProcessor.from_config(config, tokenizer, chat_template=template, published_format=True)


class LlavaLayout(SourceLayout):
    """LLaVA-style checkpoints (LLaVA-1.5, Xmodel-VLM): `model.mm_projector.*`, `model.vision_tower.vision_tower.
    vision_model.*`, `model.layers.*`, `lm_head`, config.json with the Llama fields and `mm_*` settings. The result
    has no Phantom Dimension (the baseline) and speaks Vicuna v1."""

    name, kind = "llava", "LLaVA-style checkpoint"
    head_pattern = r"^lm_head\.weight$"

    def resolve_config(self, src: Path, preset: str | None) -> PhantomConfig:
        return resolve_llava_config(src, preset)

    def prepare_tokenizer(
        self, src: Path, reader: CheckpointReader, config: PhantomConfig, trust_remote_code: bool
    ) -> tuple[PreTrainedTokenizerBase | None, int]:
        """Without a tokenizer the placeholder takes the first id past the embedding."""
        embedding = "model.embed_tokens.weight"
        rows = reader.shape(embedding)[0] if embedding in reader.names() else config.text_config.vocab_size
        tokenizer = None
        if any((src / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = load_tokenizer(src, trust_remote_code)
            if tokenizer is None:
                raise ValueError(
                    _no_tokenizer_message(src) + "; pass trust_remote_code=True (--trust-remote-code) so that "
                    "<IMG_CONTEXT> can be added to it; nothing was written"
                )
            add_image_tokens(tokenizer, tokens=(IMAGE_CONTEXT_TOKEN,))
            image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
        else:
            image_token_id = rows
        if image_token_id > rows:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens, <IMG_CONTEXT> gets id {image_token_id}, but the embedding "
                f"has only {rows} rows: ids {rows}..{image_token_id - 1} have no trained embedding; nothing was written"
            )
        grow = 1 if image_token_id == rows else 0
        config.text_config.vocab_size = rows + grow
        config.image_token_id = image_token_id
        return tokenizer, grow

    def fit_config(self, reader: CheckpointReader, config: PhantomConfig) -> None:
        """Also read the XDP group size off the projector's first weight."""
        super().fit_config(reader, config)
        if config.projector_type != "xdp":
            return
        pattern = r"^model\.mm_projector\.(?:mlp\.)?0\.weight$"
        first = next((name for name in reader.names() if re.match(pattern, name)), None)
        channels = config.vision_config.hidden_size
        if first is not None and len(reader.shape(first)) == 2 and reader.shape(first)[1] % channels == 0:
            config.projector_group_size = reader.shape(first)[1] // channels

    def map_name(self, name: str, config: PhantomConfig, vision_prefix: str, grow_rows: int) -> TensorRule | None:
        return map_llava_name(name, vision_prefix, grow_rows)

    def processor(self, src: Path, config: PhantomConfig, tokenizer: PreTrainedTokenizerBase, preset: str | None) -> PhantomProcessor:
        template = chat_template_for(preset or config)
        return PhantomProcessor.from_config(config, tokenizer, chat_template=template, pad_to_square=_pad_to_square(src, config))


SOURCES: dict[str, SourceLayout] = {layout.name: layout for layout in (PublishedPhantomLayout(), LlavaLayout())}


def source_layout(source: str) -> SourceLayout:
    """The `SourceLayout` named `source` ("phantom" or "llava")."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {tuple(SOURCES)}, got {source!r}")
    return SOURCES[source]


def _pad_to_square(src: Path, config: PhantomConfig) -> bool | None:
    """LLaVA's `image_aspect_ratio="pad"` for CLIP towers (Xmodel-VLM trains with it); None for other towers."""
    if config.vision_config.model_type != "clip_vision_model":
        return None
    config_path = src / "config.json"
    if not config_path.is_file():
        return True
    return read_json_file(config_path).get("image_aspect_ratio") == "pad"


def _write_model_card(
    folder: Path, src: Path, config: PhantomConfig, plan: ConversionPlan, preset: str | None, layout: SourceLayout
) -> None:
    """README.md with the Hub metadata, via `phantom_hf.hub` (skipped, with a warning, where it is absent)."""
    try:
        from .hub import write_model_card
    except ImportError:
        logger.warning("phantom_hf.hub is not available: no model card written")
        return
    name = preset.replace("phantom", "Phantom").upper().replace("PHANTOM", "Phantom") if preset else src.name
    num_parameters = sum(int(torch.Size(shape).numel()) for shape in plan.target_shapes.values())
    write_model_card(
        folder,
        config,
        model_name=name,
        description=f"Converted with `phantom-hf convert` from the {layout.kind} `{src.name}`.",
        num_parameters=num_parameters,
    )


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The floating-point dtype to cast weights to; anything else is refused (an integer cast would zero them)."""
    if dtype is None:
        return None
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype must name a floating-point torch dtype such as 'bfloat16', 'float16' or 'float32', got {dtype!r}; "
            "nothing was written"
        )
    return value


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    preset: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    trust_remote_code: bool = False,
    source: str = "phantom",
) -> PhantomConfig:
    """Convert the published Phantom (or LLaVA-style) checkpoint in folder `src` into a Hub-native folder `dst`.

    Args:
        src: published folder: config.json (`llm_config`, `vision_config`; for LLaVA the Llama fields and `mm_*`
            settings), weights (safetensors or `.bin`, sharded with an index json or not), optionally the tokenizer.
        dst: new or empty folder to write.
        preset: "phantom-0.5b" | "phantom-1.8b" | "phantom-3.8b" | "phantom-7b" (or "xmodel-vlm-1.1b" for LLaVA).
            Needed when `src` has no config.json; otherwise checked against it.
        dtype: cast floating-point weights to this floating-point dtype (e.g. "bfloat16"); default keeps the stored
            dtypes. Other dtypes are refused.
        max_shard_size: largest safetensors shard, in bytes or like "5GB" (also the memory a conversion needs
            beyond one tensor).
        trust_remote_code: allow running the checkpoint's own tokenizer code, needed only for a tokenizer that has
            neither a `tokenizer.json` nor a SentencePiece `tokenizer.model` (InternLM2's is rebuilt from its
            `tokenizer.model` without it: `load_tokenizer`).
        source: "phantom" or "llava" (`SOURCES`: the published Phantom layout, or LLaVA-1.5 / Xmodel-VLM, whose result
            has `phantom_dimension=False`, the baseline; load it with `phantom_dimension=True` for its twin).

    A published Phantom checkpoint's processor feeds the model as the published inference code does
    (`PhantomProcessor.from_config(..., published_format=True)`). The folder is written beside `dst` under a
    hidden staging name and renamed to `dst` when complete (`write_folder`); what killed conversions left beside
    `dst` is removed. Returns the written config. Raises `ValueError` before writing anything when a tensor is
    left unmapped, a target is left unfilled or a shape disagrees (all listed), or when `dst` is a non-empty
    folder or `dtype` is not a floating-point dtype.
    """
    src, dst = Path(src), Path(dst)
    layout = source_layout(source)
    dtype = _parse_dtype(dtype)
    max_bytes = _parse_size(max_shard_size)
    check_new_or_empty(dst)
    reader = CheckpointReader(src)
    config = layout.resolve_config(src, preset)
    tokenizer, grow_rows = layout.prepare_tokenizer(src, reader, config, trust_remote_code)
    plan = plan_conversion(reader, config, source=layout.name, grow_rows=grow_rows)

    def write(folder: Path) -> None:
        config.dtype = _write_weights(plan, reader, folder, dtype, max_bytes)
        if tokenizer is not None:
            layout.processor(src, config, tokenizer, preset).save_pretrained(folder)
        else:
            for path in [*(src / name for name in TOKENIZER_FILES), *src.glob("tokenization_*.py")]:
                if path.is_file():
                    shutil.copyfile(path, folder / path.name)
        config.save_pretrained(folder)
        save_remote_code(folder)
        _write_model_card(folder, src, config, plan, preset, layout)
        generation_config = (
            GenerationConfig.from_pretrained(src) if (src / "generation_config.json").is_file() else GenerationConfig.from_model_config(config.text_config)
        )
        generation_config.save_pretrained(folder)

    write_folder(dst, write, replace=False)
    if plan.ignored:
        logger.info("skipped %d derived buffers (e.g. %s)", len(plan.ignored), plan.ignored[0])
    if tokenizer is None and any((src / name).is_file() for name in TOKENIZER_FILES):
        logger.warning(
            "%s: no processor written: %s. Its files were copied; pass --trust-remote-code to load it with its "
            "code (the converted folder then needs that code too), or add a tokenizer.json", dst, _no_tokenizer_message(src)
        )
    return config


# ---------------------------------------------------------------------------------------------------
# Command line: `phantom-hf convert SRC DST [--preset NAME]`
# ---------------------------------------------------------------------------------------------------


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of the `convert` sub-command."""
    parser.add_argument("src", help="folder of a published Phantom (or LLaVA-style) checkpoint")
    parser.add_argument("dst", help="new or empty folder for the converted model")
    parser.add_argument(
        "--from",
        dest="source",
        choices=tuple(SOURCES),
        default="phantom",
        help="checkpoint layout: 'phantom' (published Phantom) or 'llava' (LLaVA-1.5, Xmodel-VLM)",
    )
    parser.add_argument("--preset", choices=ALL_PRESET_NAMES, default=None, help="size, required without config.json")
    parser.add_argument("--dtype", default=None, help="cast floating-point weights, e.g. bfloat16")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight shard (default 5GB)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run the checkpoint's own tokenizer code (InternLM2) to load it"
    )
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run the `convert` sub-command; returns the exit status."""
    config = convert_checkpoint(
        args.src,
        args.dst,
        args.preset,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        trust_remote_code=args.trust_remote_code,
        source=getattr(args, "source", "phantom"),
    )
    text = config.text_config
    print(
        f"converted {args.src} -> {args.dst}: {text.model_type} {text.num_hidden_layers} layers x {text.hidden_size}, "
        f"image_token_id={config.image_token_id}"
    )
    return 0


__all__ = [
    "SOURCES",
    "CheckpointReader",
    "ConversionPlan",
    "LlavaLayout",
    "PublishedPhantomLayout",
    "SourceLayout",
    "TensorRule",
    "add_convert_arguments",
    "config_from_llava",
    "config_from_published",
    "convert_checkpoint",
    "load_tokenizer",
    "map_llava_name",
    "map_published_name",
    "plan_conversion",
    "published_sliding_window",
    "resolve_config",
    "resolve_llava_config",
    "run_convert",
    "source_layout",
]
