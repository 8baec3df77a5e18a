"""Configuration of Phantom vision-language models (Phantom of Latent, arXiv 2409.14713: Phantom Dimension, Sec. 3; the published sizes, Sec. 4).

Hub remote code: this file is uploaded next to the weights and imports only torch, transformers and
its sibling files.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

# Decoders whose attention `PhantomAttention` knows how to wrap: q/k/v from `q_proj`/`k_proj`/`v_proj`
# (optionally followed by per-head `q_norm`/`k_norm`) or from one packed `qkv_proj`, rotary applied by
# the module-level `apply_rotary_pos_emb` of the backbone's modeling file. InternLM2 is loaded as Llama.
SUPPORTED_TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
PHANTOM_MIXINGS = ("weighted", "sum", "mean")
PHANTOM_EXPANSIONS = ("mhca", "repeat")
PHANTOM_CACHE_MODES = ("expanded", "compact")
PROJECTOR_TYPES = ("phantom", "xdp", "mlp2x_gelu")
VISION_FEATURE_SELECT_STRATEGIES = ("default", "full")
# Vision towers whose sequence has no CLS token in front of the patch tokens.
VISION_MODEL_TYPES_WITHOUT_CLS = ("siglip_vision_model", "siglip2_vision_model")
# FlashAttention kernels support head sizes up to 256; Phantom attention runs at 2 * head_dim.
FLASH_ATTENTION_MAX_HEAD_DIM = 256

# The Phantom modules of every attention layer, by their published names: the multi-head cross-attention of each
# of the q, k and v paths (paper Eq. 1) and the two gates of the weighted average (Eq. 3). They are the only modules
# whose name holds "phantom"; training, LoRA, quantization and loading find them through this table.
PHANTOM_MHCA_MODULES = {"q": "xattn_query_phantom", "k": "xattn_key_phantom", "v": "xattn_value_phantom"}
PHANTOM_GATE_MODULES = ("gating_phantom_1", "gating_phantom_2")
PHANTOM_MODULE_NAMES = (*PHANTOM_MHCA_MODULES.values(), *PHANTOM_GATE_MODULES)


def is_phantom_name(name: str) -> bool:
    """Whether a dotted module or parameter name lies inside a Phantom module (`PHANTOM_MODULE_NAMES`), also
    under a wrapper's prefixes (PEFT's `base_model.model.` and `modules_to_save.default.`)."""
    return any(part in PHANTOM_MODULE_NAMES for part in name.split("."))


def size_pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """A vision config's `image_size` / `patch_size` (an int, or a pair) as (height, width)."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


# Written into config.json so that the Auto classes find the remote code next to the weights.
# AutoModel maps to the generation model (as InternVL's and Phantom's published remote code do), so
# `AutoModel.from_pretrained(..., trust_remote_code=True)` returns a model with logits and `generate`.
AUTO_MAP = {
    "AutoConfig": "configuration_phantom.PhantomConfig",
    "AutoModel": "modeling_phantom.PhantomForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_phantom.PhantomForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_phantom.PhantomForConditionalGeneration",
}


def _as_config(value: Any, default_model_type: str, field: str) -> PretrainedConfig:
    """Turn a sub-config given as a dict (with or without `model_type`) or config object into a config."""
    if value is None:
        return AutoConfig.for_model(default_model_type)
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default_model_type)
        return AutoConfig.for_model(model_type, **value)
    raise TypeError(f"PhantomConfig.{field} must be a dict or a PretrainedConfig, got {type(value).__name__}")


def _field_error(kind: type[Exception], message: str, source: Any = None) -> Exception:
    """An error about a config's content, naming the folder (or repository) it was read from when known; marked
    so that `PhantomConfig.from_pretrained` adds the folder when it was not known here."""
    error = kind(f"{source}: config.json: {message}" if source else message)
    error.phantom_config_source = source
    return error


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class PhantomConfig(PretrainedConfig):
    r"""Configuration of a Phantom model: a vision tower, a projector and a decoder-only LLM whose attention
    layers carry Phantom Dimension.

    Args:
        vision_config: config (or dict) of the vision tower; default InternViT-300M-448px
            (`InternVLVisionConfig`).
        text_config: config (or dict) of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3); default
            Qwen2.
        image_token_id: id of `<IMG_CONTEXT>`, the placeholder replaced by vision tokens.
        downsample_ratio: pixel-shuffle ratio of the "phantom" projector (0.5: 1024 patches -> 256 tokens).
        projector_type: "phantom" (pixel shuffle + LayerNorm + 2-layer GELU MLP, InternVL's, paper Sec. 4), "xdp"
            (Xmodel-VLM: group `projector_group_size` tokens, Linear-Mish-Linear, arXiv 2405.09215) or "mlp2x_gelu"
            (LLaVA-1.5: Linear-GELU-Linear per token).
        projector_hidden_act: activation between the two linears of the "phantom" and "mlp2x_gelu" projectors.
        projector_group_size: consecutive vision tokens merged into one by the "xdp" projector.
        multimodal_projector_bias: whether the "mlp2x_gelu" linears have biases.
        vision_feature_layer: which hidden state of the vision tower feeds the projector (-1: last).
        vision_feature_select_strategy: "default" drops the CLS token, "full" keeps it.
        phantom_dimension: add Phantom Dimension to every attention layer; False gives the plain baseline.
        phantom_eta: scale of the expansions (q* = eta*MHCA, v* = v + eta*MHCA); must be > 0. Read at every
            forward: setting `model.config.phantom_eta` on a built model takes effect at once.
        phantom_mixing: how the two halves of the attention output are folded: "weighted" (Eq. 3), "sum", "mean".
        phantom_expansion: "mhca" (the paper) or "repeat" (Appendix E: q*, k*, v* are copies of q, k, v).
            This and `phantom_mixing` decide which modules a layer has: they are fixed when the model is built
            (changing them on a built model's config has no effect; build a new model).
        phantom_anchor_token_id: token whose first occurrence is the anchor; None means the first attended token.
        phantom_cache_mode: "expanded" caches [k, k*] and [v, v*] (O(1) extra work per decode step, twice the
            memory of a plain cache); "compact" caches plain k, v and recomputes the expansions every step. Both
            `PhantomCache` (the default) and `PhantomStaticCache` (`generate(..., cache_implementation="static")`,
            compiled decoding) take it.
    """

    model_type = "phantom"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        image_token_id: int | None = None,
        downsample_ratio: float = 0.5,
        projector_type: str = "phantom",
        projector_hidden_act: str = "gelu",
        projector_group_size: int = 4,
        multimodal_projector_bias: bool = True,
        vision_feature_layer: int = -1,
        vision_feature_select_strategy: str = "default",
        phantom_dimension: bool = True,
        phantom_eta: float = 1e-4,
        phantom_mixing: str = "weighted",
        phantom_expansion: str = "mhca",
        phantom_anchor_token_id: int | None = None,
        phantom_cache_mode: str = "expanded",
        **kwargs: Any,
    ) -> None:
        self.vision_config = _as_config(vision_config, "internvl_vision", "vision_config")
        self.text_config = _as_config(text_config, "qwen2", "text_config")
        self.image_token_id = image_token_id
        self.downsample_ratio = downsample_ratio
        self.projector_type = projector_type
        self.projector_hidden_act = projector_hidden_act
        self.projector_group_size = projector_group_size
        self.multimodal_projector_bias = multimodal_projector_bias
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.phantom_dimension = phantom_dimension
        self.phantom_eta = phantom_eta
        self.phantom_mixing = phantom_mixing
        self.phantom_expansion = phantom_expansion
        self.phantom_anchor_token_id = phantom_anchor_token_id
        self.phantom_cache_mode = phantom_cache_mode
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.validate_phantom()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "PhantomConfig":
        """Config of a published size ("phantom-0.5b", "phantom-1.8b", "phantom-3.8b", "phantom-7b"; paper Sec. 4).

        Keyword arguments override config fields; a dict given for `text_config` or `vision_config` updates the
        preset's sub-config field by field, a config object replaces it.
        """
        from .presets_phantom import preset_config_kwargs

        kwargs = preset_config_kwargs(name)
        for field in ("text_config", "vision_config"):
            if isinstance(overrides.get(field), dict):
                kwargs[field].update(overrides.pop(field))
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def phantom_head_dim(self) -> int:
        """Head size D of the decoder's attention (Phantom attention runs at 2*D)."""
        text = self.text_config
        return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads

    @property
    def vision_has_cls_token(self) -> bool:
        return self.vision_config.model_type not in VISION_MODEL_TYPES_WITHOUT_CLS

    @property
    def image_seq_length(self) -> int:
        """Vision tokens per image tile after the projector: 256 for InternViT-448 with pixel shuffle 0.5,
        144 for CLIP-336 with XDP, 576 for CLIP-336 with mlp2x_gelu."""
        image_h, image_w = size_pair(self.vision_config.image_size)
        patch_h, patch_w = size_pair(self.vision_config.patch_size)
        patches = (image_h // patch_h) * (image_w // patch_w)
        if self.vision_feature_select_strategy == "full" and self.vision_has_cls_token:
            patches += 1
        if self.projector_type == "phantom":
            return int(patches * self.downsample_ratio**2)
        if self.projector_type == "xdp":
            return patches // self.projector_group_size
        return patches

    @image_seq_length.setter
    def image_seq_length(self, value: Any) -> None:
        """Configs of InternVL's family carry `image_seq_length`: a value equal to the derived one is accepted (and
        not stored: it stays derived), another is refused by name."""
        self.validate_phantom()
        if isinstance(value, bool) or value != self.image_seq_length:
            raise ValueError(
                f"image_seq_length={value!r} disagrees with the {self.image_seq_length} vision tokens per tile that "
                f"vision_config (image_size {self.vision_config.image_size}, patch_size {self.vision_config.patch_size}), "
                f"projector_type {self.projector_type!r} and downsample_ratio {self.downsample_ratio} give; it is derived "
                "from them: leave it out"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`; a config it refuses (`validate_phantom`, a missing sub-config) is reported
        with the folder or repository it came from."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except (ValueError, TypeError) as error:
            if not hasattr(error, "phantom_config_source") or error.phantom_config_source:
                raise
            raise _field_error(type(error), str(error), pretrained_model_name_or_path) from error

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """transformers' `from_dict`, validated after the keyword overrides are applied: `from_pretrained(folder,
        phantom_mixing="foo")` sets fields after `__init__` has run, and must be refused like `PhantomConfig(...)`.

        A saved config must hold both sub-configs: the defaults (Qwen2, InternViT-300M) are for `PhantomConfig()`
        built in code, and loading them in place of a missing one would build a 7B-sized model that fits no
        weights."""
        source = kwargs.get("name_or_path")  # given by AutoConfig.from_pretrained
        for field in ("text_config", "vision_config"):
            if config_dict.get(field) is None and kwargs.get(field) is None:
                raise _field_error(
                    ValueError,
                    f"{field} is missing (or null); a saved Phantom config names both sub-configs (defaults are only "
                    "for PhantomConfig() built in code)",
                    source,
                )
        try:
            result = super().from_dict(config_dict, **kwargs)
        except (ValueError, TypeError) as error:
            raise _field_error(type(error), str(error), source) from error
        config = result[0] if isinstance(result, tuple) else result
        try:
            config.validate_phantom()
        except (ValueError, TypeError) as error:
            raise _field_error(type(error), str(error), source) from error
        return result

    def validate_phantom(self) -> None:
        """Raise `ValueError` naming the field when a Phantom setting is invalid."""
        if not isinstance(self.phantom_dimension, bool):
            raise ValueError(f"phantom_dimension must be True or False, got {self.phantom_dimension!r}")
        vocab_size = getattr(self.text_config, "vocab_size", None)
        for field in ("image_token_id", "phantom_anchor_token_id"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field} must be an int or None, got {value!r}")
            if value < 0 or (vocab_size is not None and value >= vocab_size):
                raise ValueError(
                    f"{field}={value} is outside the vocabulary of text_config.vocab_size={vocab_size} tokens "
                    f"(ids 0..{vocab_size - 1 if vocab_size else '?'})"
                )
        if self.phantom_mixing not in PHANTOM_MIXINGS:
            raise ValueError(f"phantom_mixing must be one of {PHANTOM_MIXINGS}, got {self.phantom_mixing!r}")
        if self.phantom_expansion not in PHANTOM_EXPANSIONS:
            raise ValueError(f"phantom_expansion must be one of {PHANTOM_EXPANSIONS}, got {self.phantom_expansion!r}")
        if self.phantom_cache_mode not in PHANTOM_CACHE_MODES:
            raise ValueError(
                f"phantom_cache_mode must be one of {PHANTOM_CACHE_MODES}, got {self.phantom_cache_mode!r}"
            )
        if isinstance(self.phantom_eta, bool) or not isinstance(self.phantom_eta, (int, float)) or self.phantom_eta <= 0:
            raise ValueError(f"phantom_eta must be a number > 0, got {self.phantom_eta!r}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.vision_feature_select_strategy == "default" and not self.vision_has_cls_token:
            raise ValueError(
                f"vision_feature_select_strategy='default' drops a CLS token, but {self.vision_config.model_type} "
                "has none; use 'full'"
            )
        if not _is_int(self.projector_group_size) or self.projector_group_size < 1:
            raise ValueError(f"projector_group_size must be a positive int, got {self.projector_group_size!r}")
        if self.vision_feature_select_strategy not in VISION_FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                "vision_feature_select_strategy must be one of "
                f"{VISION_FEATURE_SELECT_STRATEGIES}, got {self.vision_feature_select_strategy!r}"
            )
        if (
            not _is_number(self.downsample_ratio)
            or self.downsample_ratio <= 0
            or abs(1 / self.downsample_ratio - round(1 / self.downsample_ratio)) > 1e-6
        ):
            raise ValueError(f"downsample_ratio must be 1/k for an integer k, got {self.downsample_ratio!r}")
        vision_layers = getattr(self.vision_config, "num_hidden_layers", None)
        if not _is_int(self.vision_feature_layer) or (
            _is_int(vision_layers) and not -vision_layers - 1 <= self.vision_feature_layer <= vision_layers
        ):
            raise ValueError(
                f"vision_feature_layer must be an int indexing the vision tower's {vision_layers}+1 hidden states "
                f"(-1: the last), got {self.vision_feature_layer!r}"
            )
        if not isinstance(self.projector_hidden_act, str) or self.projector_hidden_act not in ACT2FN:
            raise ValueError(f"projector_hidden_act must name a transformers activation such as 'gelu', got {self.projector_hidden_act!r}")
        if not isinstance(self.multimodal_projector_bias, bool):
            raise ValueError(f"multimodal_projector_bias must be True or False, got {self.multimodal_projector_bias!r}")
        if self.phantom_dimension:
            model_type = self.text_config.model_type
            if model_type not in SUPPORTED_TEXT_MODEL_TYPES:
                raise ValueError(
                    f"text_config.model_type {model_type!r} has an attention Phantom Dimension cannot wrap; "
                    f"supported: {SUPPORTED_TEXT_MODEL_TYPES} (or set phantom_dimension=False)"
                )
            self.validate_attn_implementation(getattr(self.text_config, "_attn_implementation", None))

    def validate_attn_implementation(self, attn_implementation: str | None) -> None:
        """FlashAttention handles head sizes up to 256; Phantom attention needs 2*head_dim of them."""
        if (
            self.phantom_dimension
            and attn_implementation is not None
            and "flash" in attn_implementation
            and 2 * self.phantom_head_dim > FLASH_ATTENTION_MAX_HEAD_DIM
        ):
            raise ValueError(
                f"attn_implementation={attn_implementation!r}: Phantom attention runs at 2*head_dim = "
                f"{2 * self.phantom_head_dim} > {FLASH_ATTENTION_MAX_HEAD_DIM}, the largest head size FlashAttention "
                "supports; use 'sdpa' or 'eager'"
            )


__all__ = ["PHANTOM_GATE_MODULES", "PHANTOM_MHCA_MODULES", "PHANTOM_MODULE_NAMES", "PhantomConfig", "is_phantom_name", "size_pair"]
