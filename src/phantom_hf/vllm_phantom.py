"""Phantom as a native vLLM model: continuous batching, paged attention and the OpenAI-compatible server.

vLLM's runtime needs its own model class: its attention works on a flattened batch of tokens from many sequences,
whose keys and values live in paged blocks that vLLM manages. This module is that class for Phantom; the
transformers classes in `phantom_hf.modeling` stay the single source of the model for transformers, and the
Phantom Dimension math here is theirs (`PhantomAttentionMixin`: the MHCA expansions of Eq. 1, the fold of Eq. 3,
`PhantomProjector`, `PhantomModel.get_image_features`), called on vLLM's tensors.

Phantom Dimension in vLLM (paper Sec. 3, Eq. 1-3)
    Each decoder layer projects q, k, v with the backbone's weights, applies rotary, expands them to 2*head_dim by
    the MHCA to the anchor's q/k/v, and runs vLLM's own `Attention` at head size 2*head_dim with the backbone's scale
    1/sqrt(head_dim) (Eq. 2 with lambda = sqrt(2)); the cache therefore holds the expanded keys/values, as
    `PhantomCache` does. The output is folded back to head_dim (Eq. 3) before o_proj.

The anchor without per-sequence state
    The anchor is each sequence's first token (position 0; vLLM has no padding). Under causal attention at
    position 0 a token sees only itself and rotary is the identity, so its hidden states, and its q/k/v in every
    layer, depend on its token id alone. Two pieces use that:

    * `PhantomAnchorLookup` is one extra vLLM attention layer, with the same cache layout as the decoder layers,
      that writes the bits of each sequence's position-0 token id into that token's value and reads them back for
      every token: its query matches only the position-0 key, with a score 10^4 above every other key, so the
      softmax weight of position 0 is exactly 1 and the others exactly 0. Which anchor a token belongs to is thus
      kept in vLLM's KV cache like everything else about a sequence: prefills, chunked prefills, decodes, prefix
      caching and preemption need nothing from the model between steps. Cost: one more layer of KV cache
      (1/num_layers more) and one small attention per step.
    * the anchor-side operands of the fused MHCA in every layer (gelu(Lk(a)) and Lo(gelu(Lv(a))) of the anchor's
      q/k/v) are thus a pure function of the anchor's token id and the weights: the language model keeps them per
      token id (`anchor_table`, filled on first use, cleared with new weights). A forward pass that meets an anchor id
      not in the table appends one row for it to the hidden states, at position 0, and runs it through the layers
      beside the tokens: its attention output is its own expanded value (softmax over one key), and each layer
      computes the operands from its q/k/v, the ones transformers computes for that token at prefill.

    The forward pass has data-dependent shapes (the new anchors), so the model runs eagerly: vLLM does not
    torch.compile it nor capture CUDA graphs of it.

Limits, refused with the reason: at load, `phantom_anchor_token_id` (an anchor that is not the first token depends
on the prefix) and tensor or pipeline parallelism (the MHCA of a head attends over all heads of the anchor; README,
"Serving with vLLM"); per request, a prompt whose first token would be an image embedding.

Images go through `PhantomProcessor` (`phantom_hf.modeling.processing_phantom`: dynamic tiling, no torchvision),
called by vLLM's multimodal processing; vLLM expands each `<image>` marker with the processor's placeholders.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, BatchFeature, PretrainedConfig
from vllm.config import CacheConfig, VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.inputs import MultiModalDataDict, MultiModalInput
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
    TimingContext,
)
from vllm.sequence import IntermediateTensors

from .modeling.configuration_phantom import SUPPORTED_TEXT_MODEL_TYPES
from .modeling.modeling_phantom import PROJECTOR_CLASSES, PhantomAttentionMixin, PhantomModel
from .modeling.processing_phantom import IMAGE_MARKER, PhantomProcessor

# Score of the anchor-lookup query on the position-0 key (every other key scores 0): exp(-1e4) is 0 in every float
# type, so the lookup reads position 0 exactly.
ANCHOR_LOOKUP_SCALE = 1e4
# Anchor ids whose operands the model keeps (a few hundred KB each at the published sizes); the table starts over
# when it is full.
ANCHOR_TABLE_SIZE = 256
# Token ids are carried as this many bits (0/1 values are exact in every KV-cache dtype): ids below 2**31.
ANCHOR_ID_BITS = 31


def _backbone_biases(text_config: PretrainedConfig) -> tuple[bool, bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP bias, per-head q/k RMSNorm) of a supported decoder, as transformers builds it."""
    model_type = text_config.model_type
    attention_bias = bool(getattr(text_config, "attention_bias", False))
    if model_type == "qwen2":
        return True, False, False, False
    if model_type == "qwen3":
        return attention_bias, attention_bias, False, True
    if model_type == "llama":
        return attention_bias, attention_bias, bool(getattr(text_config, "mlp_bias", False)), False
    if model_type in ("mistral", "phi3"):
        return False, False, False, False
    raise ValueError(f"Phantom on vLLM supports the decoders {SUPPORTED_TEXT_MODEL_TYPES}, not {model_type!r}")


def _sliding_window(text_config: PretrainedConfig, layer_index: int) -> int | None:
    """The sliding window transformers gives this layer: per `layer_types` where the config has them, else the
    config's `sliding_window` (Mistral, Phi-3), else none."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_index] == "sliding_attention" else None
    return window


@dataclass
class AnchorRows:
    """The anchors of one forward pass. The first `num_tokens` rows of the hidden states are the batch's tokens; one
    row follows for each anchor not yet in the model's table. `anchor_of_row` (rows,) indexes every row's anchor in
    [anchors from the table, new anchors]; `known` holds the table's operands, (layers, known anchors, H_all, D) keys
    and values; each layer appends the operands it computes for the new anchors to `computed`."""

    num_tokens: int
    anchor_of_row: torch.Tensor
    new_ids: list[int]
    known: tuple[torch.Tensor, torch.Tensor] | None
    computed: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class PhantomAnchorLookup(nn.Module):
    """Every token's anchor token id (its sequence's position-0 token), read from vLLM's KV cache.

    An attention layer whose key is 1 in the first channel of every head at position 0 and 0 elsewhere, whose
    query is 1 there, and whose value carries the bits of the token id: with the score scale `ANCHOR_LOOKUP_SCALE`
    the softmax puts weight exactly 1 on position 0, so the output is the bits of the sequence's first token. It has
    the decoder layers' cache layout (heads, head size), so vLLM pages it with them.
    """

    def __init__(self, num_kv_heads: int, head_size: int, vocab_size: int, cache_config: CacheConfig | None, prefix: str) -> None:
        super().__init__()
        if num_kv_heads * head_size < ANCHOR_ID_BITS:
            raise ValueError(f"the anchor lookup needs {ANCHOR_ID_BITS} value channels, the cache layout has {num_kv_heads * head_size}")
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.vocab_size = vocab_size
        if cache_config is not None and cache_config.sliding_window is not None:
            # position 0 must stay visible to every token: no window, whatever the backbone's layers use
            cache_config = copy.copy(cache_config)
            cache_config.sliding_window = None
        self.attn = Attention(
            num_kv_heads, head_size, ANCHOR_LOOKUP_SCALE, num_kv_heads=num_kv_heads, cache_config=cache_config, prefix=prefix
        )
        self.register_buffer("bit_values", 2 ** torch.arange(ANCHOR_ID_BITS), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        tokens = input_ids.shape[0]
        width = self.num_kv_heads * self.head_size
        query = torch.zeros(tokens, self.num_kv_heads, self.head_size, dtype=dtype, device=input_ids.device)
        query[..., 0] = 1
        key = torch.zeros_like(query)
        key[..., 0] = (positions == 0).to(dtype)[:, None]
        value = torch.zeros(tokens, width, dtype=dtype, device=input_ids.device)
        value[:, :ANCHOR_ID_BITS] = ((input_ids[:, None] // self.bit_values) % 2).to(dtype)
        output = self.attn(query.view(tokens, width), key.view(tokens, width), value)
        bits = output[:, :ANCHOR_ID_BITS] > 0.5
        # rows past the scheduled tokens (padding) hold no result: keep their ids in range
        return (bits.long() * self.bit_values).sum(-1).clamp_(0, self.vocab_size - 1)


class PhantomVLLMAttention(PhantomAttentionMixin, nn.Module):
    """A decoder layer's attention with Phantom Dimension on vLLM's paged attention.

    The backbone's projections, q/k norms and rotary are vLLM layers loaded from the backbone's weights; the
    Phantom modules (`xattn_{query,key,value}_phantom`, `gating_phantom_{1,2}`) and the expansion and fold are
    `PhantomAttentionMixin`'s, the same code transformers runs. Without Phantom Dimension it is the backbone's
    attention.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        layer_index: int,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        text = config.text_config
        self.config = text  # PhantomAttentionMixin.init_phantom reads the head counts here
        self.head_dim = config.phantom_head_dim
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.phantom = bool(config.phantom_dimension)
        self.layer_index = layer_index
        qkv_bias, o_bias, _, qk_norm = _backbone_biases(text)
        self.qkv_proj = QKVParallelLinear(
            text.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, bias=qkv_bias,
            quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.q_size, text.hidden_size, bias=o_bias, quant_config=quant_config, prefix=f"{prefix}.o_proj"
        )
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=text.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=text.rms_norm_eps)
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=text.max_position_embeddings,
            rope_parameters=getattr(text, "rope_parameters", None),
            is_neox_style=True,
        )
        attention_head_size = 2 * self.head_dim if self.phantom else self.head_dim
        self.attn = Attention(
            self.num_heads,
            attention_head_size,
            self.head_dim**-0.5,  # the backbone's 1/sqrt(D), also at 2*D: Eq. 2 with lambda = sqrt(2)
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=_sliding_window(text, layer_index),
            prefix=f"{prefix}.attn",
        )
        if self.phantom:
            self.init_phantom(config)

    def _project(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The backbone's q, k, v of shape (rows, heads * D), q/k-normed and rotated."""
        qkv, _ = self.qkv_proj(hidden_states)
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if hasattr(self, "q_norm"):
            rows = query.shape[0]
            query = self.q_norm(query.reshape(rows, self.num_heads, self.head_dim)).view(rows, self.q_size)
            key = self.k_norm(key.reshape(rows, self.num_kv_heads, self.head_dim)).view(rows, self.kv_size)
        query, key = self.rotary_emb(positions, query, key)
        return query, key, value

    def _anchor_operands(self, states: tuple[torch.Tensor, ...], anchors: AnchorRows) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused MHCA's anchor operands for every row, as `_phantom_expand` takes them: the table's for known
        anchors, computed from the anchor rows (q/k/v at position 0) for new ones and handed back in `anchors`."""
        keys, values = [], []
        if anchors.known is not None:
            keys.append(anchors.known[0][self.layer_index])
            values.append(anchors.known[1][self.layer_index])
        new_rows = tuple(state[anchors.num_tokens :] for state in states)
        if new_rows[0].shape[0]:
            first = torch.zeros(new_rows[0].shape[0], dtype=torch.long, device=new_rows[0].device)
            computed = self._phantom_anchors(*new_rows, first)
            anchors.computed.append(computed)
            keys.append(computed[0])
            values.append(computed[1])
        key, value = (parts[0] if len(parts) == 1 else torch.cat(parts) for parts in (keys, values))
        rows = anchors.anchor_of_row.shape[0]
        if key.shape[0] == 1:  # the usual case, one anchor for the whole batch: no copy
            key, value = key.expand(rows, -1, -1), value.expand(rows, -1, -1)
        else:
            key, value = key[anchors.anchor_of_row], value[anchors.anchor_of_row]
        return key, value

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, anchors: AnchorRows | None) -> torch.Tensor:
        query, key, value = self._project(positions, hidden_states)
        if not self.phantom:
            output, _ = self.o_proj(self.attn(query, key, value))
            return output
        rows, dim = query.shape[0], self.head_dim
        # one token per row: (rows, heads, 1, D), the layout PhantomAttentionMixin works on
        states = (
            query.reshape(rows, self.num_heads, 1, dim),
            key.reshape(rows, self.num_kv_heads, 1, dim),
            value.reshape(rows, self.num_kv_heads, 1, dim),
        )
        products = None
        tokens = rows
        if anchors is not None:
            tokens = anchors.num_tokens
            products = self._anchor_operands(states, anchors)
        query, key, value = (state.reshape(rows, -1, 2 * dim) for state in self._phantom_expand("qkv", states, products))
        output = torch.empty(rows, self.num_heads, 2 * dim, dtype=query.dtype, device=query.device)
        output[:tokens] = self.attn(
            query[:tokens].reshape(tokens, -1), key[:tokens].reshape(tokens, -1), value[:tokens].reshape(tokens, -1)
        ).view(tokens, self.num_heads, 2 * dim)
        # an anchor row sees only itself: its attention output is its own expanded value, per query head's group
        output[tokens:] = value[tokens:].repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        output, _ = self.o_proj(self._phantom_fold(output).reshape(rows, self.q_size))
        return output


class PhantomDecoderLayer(nn.Module):
    """Pre-norm decoder layer of the supported backbones (RMSNorm, attention, RMSNorm, gated SiLU MLP)."""

    def __init__(
        self,
        config: PretrainedConfig,
        layer_index: int,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        text = config.text_config
        self.self_attn = PhantomVLLMAttention(config, layer_index, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            hidden_act=text.hidden_act,
            quant_config=quant_config,
            bias=_backbone_biases(text)[2],
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        anchors: AnchorRows | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, anchors)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


# Checkpoint names of the backbones' separate projections -> vLLM's stacked parameters (Phi-3 checkpoints already
# hold `qkv_proj` and `gate_up_proj`, which load as they are).
_STACKED_WEIGHTS = WeightsMapper(
    orig_to_new_stacked={
        ".q_proj": (".qkv_proj", "q"),
        ".k_proj": (".qkv_proj", "k"),
        ".v_proj": (".qkv_proj", "v"),
        ".gate_proj": (".gate_up_proj", 0),
        ".up_proj": (".gate_up_proj", 1),
    }
)


class PhantomLanguageModel(nn.Module):
    """The decoder stack (embeddings, layers, final norm) with Phantom Dimension, plus the anchor lookup."""

    def __init__(self, vllm_config: VllmConfig, config: PretrainedConfig, prefix: str = "") -> None:
        super().__init__()
        text = config.text_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(
            text.vocab_size, text.hidden_size, quant_config=quant_config, prefix=f"{prefix}.embed_tokens"
        )
        self.layers = nn.ModuleList(
            PhantomDecoderLayer(config, index, cache_config, quant_config, prefix=f"{prefix}.layers.{index}")
            for index in range(text.num_hidden_layers)
        )
        self.norm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        # anchor token id -> the anchor-side MHCA operands of every layer, (layers, H_all, D) keys and values: a pure
        # function of the token id and the weights (see the module docstring), filled on first use
        self.anchor_table: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.anchor_lookup: PhantomAnchorLookup | None = None
        if config.phantom_dimension and config.phantom_expansion == "mhca":
            # vLLM orders cache layers by the one integer in their name: this one comes after the decoder layers
            self.anchor_lookup = PhantomAnchorLookup(
                text.num_key_value_heads,
                2 * config.phantom_head_dim,
                text.vocab_size,
                cache_config,
                prefix=f"{prefix}.anchor_lookup.{text.num_hidden_layers}.attn",
            )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        tokens = hidden_states.shape[0]
        anchors = None
        if self.anchor_lookup is not None:
            if input_ids is None:
                raise ValueError("Phantom Dimension needs the token ids of the batch to find each sequence's anchor")
            anchors = self._anchors(self.anchor_lookup(input_ids[:tokens], positions[:tokens], hidden_states.dtype))
            new_ids = anchors.anchor_of_row.new_tensor(anchors.new_ids)
            hidden_states = torch.cat([hidden_states[:tokens], self.embed_input_ids(new_ids)])
            positions = torch.cat([positions[:tokens], positions.new_zeros(new_ids.shape[0])])
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, anchors)
        hidden_states, _ = self.norm(hidden_states, residual)
        if anchors is not None and anchors.new_ids:
            self._remember(anchors)
        return hidden_states[:tokens]

    def _anchors(self, anchor_ids: torch.Tensor) -> AnchorRows:
        """The pass's anchors: each distinct anchor id in the table, or else a new anchor row (position 0)."""
        unique_ids, anchor_of_token = torch.unique(anchor_ids, return_inverse=True)
        ids = unique_ids.tolist()
        known = [token for token in ids if token in self.anchor_table]
        new = [token for token in ids if token not in self.anchor_table]
        slot = {token: index for index, token in enumerate(known + new)}
        anchor_of_token = anchor_ids.new_tensor([slot[token] for token in ids])[anchor_of_token]
        new_slots = torch.arange(len(known), len(known) + len(new), device=anchor_ids.device)
        operands = None
        if known:
            operands = tuple(torch.stack([self.anchor_table[token][part] for token in known], dim=1) for part in (0, 1))
        anchor_of_row = torch.cat([anchor_of_token, new_slots])
        return AnchorRows(num_tokens=anchor_ids.shape[0], anchor_of_row=anchor_of_row, new_ids=new, known=operands)

    def _remember(self, anchors: AnchorRows) -> None:
        """Keep the operands the layers computed for new anchors: (layers, H_all, D) keys and values per token id."""
        if len(self.anchor_table) + len(anchors.new_ids) > ANCHOR_TABLE_SIZE:
            self.anchor_table.clear()
        keys, values = (torch.stack([operands[part] for operands in anchors.computed]) for part in (0, 1))
        for index, token in enumerate(anchors.new_ids):
            self.anchor_table[token] = (keys[:, index].clone(), values[:, index].clone())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        self.anchor_table.clear()  # computed from the weights these replace
        return AutoWeightsLoader(self).load_weights(weights, mapper=_STACKED_WEIGHTS)


# ---------------------------------------------------------------------------------------------------
# Image inputs: PhantomProcessor under vLLM's multimodal processing
# ---------------------------------------------------------------------------------------------------


class PhantomProcessingInfo(BaseProcessingInfo):
    """What vLLM needs to know about Phantom's image inputs, answered by `PhantomProcessor`."""

    def get_hf_processor(self, **kwargs: object) -> PhantomProcessor:
        return self.ctx.get_hf_processor(PhantomProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int, processor: PhantomProcessor | None = None) -> int:
        """Prompt tokens one image becomes: its placeholders and, when wrapped, `<img>` and `</img>`."""
        processor = processor or self.get_hf_processor()
        tokens = processor._get_num_multimodal_tokens(image_sizes=[[image_height, image_width]])
        return int(tokens.num_image_tokens[0])

    def get_image_size_with_most_features(self) -> ImageSize:
        """An image that is cut into the most tiles: `max_patches` tiles side by side (plus the thumbnail)."""
        processor = self.get_hf_processor()
        image_processor = processor.image_processor
        columns = int(image_processor.max_patches) if getattr(image_processor, "crop_to_patches", False) else 1
        return ImageSize(width=processor.tile_size * columns, height=processor.tile_size)

    def get_max_image_tokens(self) -> int:
        size = self.get_image_size_with_most_features()
        return self.get_num_image_tokens(image_width=size.width, image_height=size.height)


class PhantomDummyInputsBuilder(BaseDummyInputsBuilder[PhantomProcessingInfo]):
    """Largest image inputs, for vLLM's memory profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_MARKER * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        size = self.info.get_image_size_with_most_features()
        images = self._get_dummy_images(
            width=size.width, height=size.height, num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")
        )
        return {"image": images}


class PhantomMultiModalProcessor(BaseMultiModalProcessor[PhantomProcessingInfo]):
    """Runs `PhantomProcessor` on a request's images (tiles, `num_patches`) and replaces each `<image>` marker of
    the prompt with the processor's placeholder sequence; the vision tokens go to the `<IMG_CONTEXT>` positions."""

    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str | None:
        # PhantomProcessor checks the images against the markers of a text
        return IMAGE_MARKER * mm_counts.get("image", 0)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_patches = hf_inputs.get("num_patches", torch.empty(0))
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", num_patches),
            "num_patches": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        tokenizer = self.info.get_tokenizer()
        num_patches = out_mm_kwargs.get_data().get("num_patches", torch.empty(0)).tolist()

        def replacement(index: int) -> PromptUpdateDetails:
            text = processor.replace_image_token({"num_patches": num_patches}, index)
            ids = tokenizer.encode(text, add_special_tokens=False)
            return PromptUpdateDetails.select_token_id(ids, processor.image_token_id)

        marker = tokenizer.encode(IMAGE_MARKER, add_special_tokens=False)
        return [PromptReplacement(modality="image", target=marker, replacement=replacement)]

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        result = super().apply(inputs, timing_ctx)
        config = self.info.get_hf_config()
        prompt = result["prompt_token_ids"]
        if config.phantom_dimension and prompt and prompt[0] == config.image_token_id:
            raise ValueError(
                "the prompt starts with an image placeholder: Phantom's anchor (the first token) must be a text token; "
                "start the prompt with the chat template (or any text) before the first image"
            )
        return result


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


def _check_supported(config: PretrainedConfig) -> None:
    """Refuse, with the reason, what this vLLM model does not run exactly."""
    if get_tensor_model_parallel_world_size() > 1:
        raise ValueError(
            "Phantom on vLLM runs with tensor_parallel_size=1: the MHCA of Phantom Dimension lets every head attend "
            "over all heads of the anchor, which a tensor-parallel split of the heads does not hold on one rank "
            "(README, 'Serving with vLLM'). Use data parallelism (several replicas) instead."
        )
    if config.phantom_dimension and config.phantom_anchor_token_id is not None:
        raise ValueError(
            f"phantom_anchor_token_id={config.phantom_anchor_token_id}: Phantom on vLLM takes the first token as the "
            "anchor; an anchor elsewhere depends on the tokens before it and is not supported"
        )
    _backbone_biases(config.text_config)


def _suppressed_token_ids(vllm_config: VllmConfig) -> list[int]:
    """Token ids the model never emits: `image_token_id` (a placeholder without its image cannot be embedded) and
    the `suppress_tokens` of the folder's generation_config.json, which transformers' `generate` applies and vLLM's
    sampling parameters do not carry."""
    config = vllm_config.model_config.hf_config
    suppressed = vllm_config.model_config.try_get_generation_config().get("suppress_tokens") or []
    vocab_size = config.text_config.vocab_size
    ids = sorted({int(config.image_token_id), *(int(token) for token in suppressed)})
    out_of_range = [token for token in ids if not 0 <= token < vocab_size]
    if out_of_range:
        raise ValueError(f"generation_config.json: suppress_tokens {out_of_range} are outside the vocabulary (size {vocab_size})")
    return ids


@MULTIMODAL_REGISTRY.register_processor(
    PhantomMultiModalProcessor, info=PhantomProcessingInfo, dummy_inputs=PhantomDummyInputsBuilder
)
class PhantomForConditionalGeneration(nn.Module, SupportsMultiModal):
    """Phantom for vLLM: vision tower + projector (transformers modules, run as `PhantomModel` runs them) and the
    decoder with Phantom Dimension on vLLM's layers. Loads the weights of a folder written by `save_pretrained`."""

    # the anchor lookup needs the token ids of the batch next to the (image-merged) input embeddings
    requires_raw_input_tokens = True

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"model.": ""})

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_MARKER
        raise ValueError(f"Phantom takes images, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        _check_supported(config)
        self.config = config
        text = config.text_config
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = AutoModel.from_config(config.vision_config)
            self.multi_modal_projector = PROJECTOR_CLASSES[config.projector_type](config)
        with self._mark_language_model(vllm_config):
            self.language_model = PhantomLanguageModel(vllm_config, config, prefix=maybe_prefix(prefix, "language_model"))
        self.lm_head = ParallelLMHead(
            text.vocab_size, text.hidden_size, quant_config=vllm_config.quant_config, prefix=maybe_prefix(prefix, "lm_head")
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.language_model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.register_buffer("suppressed_token_ids", torch.tensor(_suppressed_token_ids(vllm_config)), persistent=False)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Vision tokens of each image, (tiles * image_seq_length, hidden), in prompt order."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        num_patches = torch.as_tensor(kwargs["num_patches"]).flatten().tolist()
        features = PhantomModel.get_image_features(self, pixel_values)  # tower, CLS drop, projector: PhantomModel's
        return features.flatten(0, 1).split([count * features.shape[1] for count in num_patches])

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if not get_pp_group().is_first_rank or intermediate_tensors is not None:
            raise ValueError("Phantom on vLLM does not support pipeline parallelism")
        return self.language_model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The backbone's logits with the image placeholder and the folder's `suppress_tokens` at -inf, so that no
        sampling setting picks them (as transformers' `generate` suppresses them)."""
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is not None:
            logits.index_fill_(-1, self.suppressed_token_ids, float("-inf"))
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


__all__ = ["PhantomAnchorLookup", "PhantomForConditionalGeneration", "PhantomMultiModalProcessor", "PhantomProcessingInfo"]
