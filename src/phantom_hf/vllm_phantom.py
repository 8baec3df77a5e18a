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
      q/k/v) are thus a pure function of the anchor's token id and the weights: `PhantomAnchorTable` keeps them per
      token id on the device (fixed size, least recently used out, cleared with new weights). In each pass every
      row at position 0 computes its own token's anchor where it stands (its attention output is its own expanded
      value, softmax over one key, as transformers computes that token at prefill), and every other row takes its
      anchor's operands from the table or from such a row of the same pass. With prefix caching on, one more row at
      position 0 follows the batch's tokens: it computes an anchor that is in neither place (a prefix-cache hit on a
      sequence whose first token the table no longer holds); without it every sequence starts at position 0 and that
      row is left out. Each layer computes the operands of the rows at position 0 (on a GPU: of every row, to keep
      fixed shapes for CUDA graphs) and writes the new anchors' to the table.

    Nothing in the forward pass synchronises with the host or has a data-dependent shape (the rows are the batch's
    tokens plus the fallback rows, a number fixed at load), so vLLM compiles it (`support_torch_compile`) and, on a
    GPU, captures CUDA graphs of it. On the CPU, where host and device are one, the anchor operands of the position-0
    rows are computed by an op outside the compiled graph (`anchor_operands_at_position_zero`) that picks those rows: a
    decode pass, which has none, skips the six products per layer.

    The limit of the table: a pass in which more anchors than fallback rows are missing (two prefix-cache hits in one
    step on different first tokens that the table, `ANCHOR_TABLE_SIZE` or 2 * max_num_seqs + 1 ids, no longer holds)
    computes only the first; `PhantomAnchorTable.misses` counts the rows that found no anchor.

Tensor parallelism: the backbone's projections, MLP, embeddings and LM head are vLLM's parallel layers, each rank
holds its share of the heads; the MHCA of every head attends over all heads of the anchor, so each layer
all-gathers the rows' anchor operands (one all-gather per layer). Pipeline parallelism is refused (the anchor rows
and table would have to travel between stages).

Limits, refused with the reason: at load, `phantom_anchor_token_id` (an anchor that is not the first token depends
on the prefix), pipeline parallelism, tensor parallelism that does not divide the key/value heads; per request, a
prompt whose first token would be an image embedding.

Images go through `PhantomProcessor` (`phantom_hf.modeling.processing_phantom`: dynamic tiling, no torchvision),
called by vLLM's multimodal processing; vLLM expands each `<image>` marker with the processor's placeholders.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.library import Library
from transformers import AutoModel, BatchFeature, PretrainedConfig
from vllm.config import CacheConfig, VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.compilation.decorators import support_torch_compile
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.inputs import MultiModalDataDict, MultiModalInput
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
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
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import direct_register_custom_op

from .modeling.configuration_phantom import SUPPORTED_TEXT_MODEL_TYPES
from .modeling.modeling_phantom import PROJECTOR_CLASSES, PhantomAttentionMixin, PhantomModel, phantom_anchor_operands
from .modeling.processing_phantom import IMAGE_MARKER, PhantomProcessor

# Score of the anchor-lookup query on the position-0 key (every other key scores 0): exp(-1e4) is 0 in every float
# type, so the lookup reads position 0 exactly.
ANCHOR_LOOKUP_SCALE = 1e4
# Anchor ids whose operands the model keeps at least (layers * (H_q + 2 H_kv) * head_dim * 2 values each: 110 KB at the
# 0.5B shape in bfloat16); the least recently used make room for new ones.
ANCHOR_TABLE_SIZE = 256
# Rows at position 0 that each pass adds after its tokens when prefix caching is on, for an anchor that is neither in
# the table nor at position 0 in the batch (a prefix-cache hit on a sequence whose first token the table no longer
# holds). Without prefix caching (or an external KV cache) every sequence starts, and restarts after preemption, at
# position 0, so its anchor is computed there and is in the table from then on: no fallback row.
ANCHOR_FALLBACK_ROWS = 1
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


def load_state(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Write `value` into a buffer that the weights determine, through the `weight_loader` vLLM gives it while it
    reloads weights in place (`reload_weights`: the buffers are then placeholders, and vLLM puts every buffer that saw
    no load back as it was), else by copying."""
    getattr(tensor, "weight_loader", default_weight_loader)(tensor, value)


def anchor_operands_at_position_zero(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    computes: torch.Tensor,
    key_value_weights: torch.Tensor,
    output_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor operands (`phantom_anchor_operands`) of the rows where `computes` is set (`AnchorPlan.computes`),
    the other rows left unset: (rows, H_all, 3 D) keys and (rows, H_all, D) values from the rows' (rows, H_path, D)
    q, k, v and the stacked anchor-side weights (3, 2 D, D) and (3, D, D).

    Only those rows' operands are read (the others' go to the table's spare slot, which nothing reads), and a decode
    pass has none: it allocates and returns. Which rows they are is data, so this runs as an op of its own outside
    the compiled graph (registered on the CPU only: picking the rows reads them on the host, which on a GPU would
    synchronise and break CUDA graphs).
    """
    keys, values = _anchor_operands_shapes(query, key, value)
    selected = computes.nonzero().squeeze(1)  # cheaper than a test with `any` (a reduction, then a read)
    if selected.numel():
        weights = tuple(zip(key_value_weights, output_weights))
        keys[selected], values[selected] = phantom_anchor_operands(query[selected], key[selected], value[selected], weights)
    return keys, values


def _anchor_operands_shapes(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *rows_and_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`anchor_operands_at_position_zero`'s outputs, uninitialised: (rows, H_all, 3 D) and (rows, H_all, D) (also
    what the compiler traces)."""
    rows, dim = query.shape[0], query.shape[-1]
    heads = query.shape[1] + key.shape[1] + value.shape[1]
    return query.new_empty(rows, heads, 3 * dim), query.new_empty(rows, heads, dim)


# Whether the position-0 rows are picked on the host (`anchor_operands_at_position_zero`, registered only then): decided
# once, so that every layer's choice and the op's registration agree
ANCHOR_ROWS_ON_HOST = current_platform.is_cpu()
_PHANTOM_OPS = Library("phantom_hf", "FRAGMENT")  # lives as long as the module: the ops' registrations with it
if ANCHOR_ROWS_ON_HOST:
    direct_register_custom_op(
        "anchor_operands_at_position_zero",
        anchor_operands_at_position_zero,
        fake_impl=_anchor_operands_shapes,
        target_lib=_PHANTOM_OPS,
    )


@dataclass
class AnchorPlan:
    """Where every row of one forward pass finds its anchor's MHCA operands (all tensors on the device, fixed shapes).

    Rows: the pass's `num_tokens` tokens, then the table's `fallback_rows` rows at position 0 (a fallback anchor). Per
    row: `known` (its anchor id is in the table, at `slot`) or else `source`, the row that computes the anchor in
    this pass (a position-0 row with the anchor's token id, or a fallback row). `first` marks the rows at
    position 0 (their attention sees only themselves); `computes` the rows whose own operands the pass reads (those
    at position 0, and a miss, which reads its own row where there are no fallback rows; none in a decode pass).
    The candidate rows (position 0, fallback) whose operands are new write them to `new_slot` (the table's spare
    slot for the others).
    """

    num_tokens: int
    first: torch.Tensor
    computes: torch.Tensor
    known: torch.Tensor
    slot: torch.Tensor
    source: torch.Tensor
    new_slot: torch.Tensor


class PhantomAnchorTable(nn.Module):
    """The anchor-side MHCA operands of recent anchor token ids, on the device: per layer (slots + 1, H_all, 3 D) keys
    and (slots + 1, H_all, D) values (the layout of `PhantomAttentionMixin._phantom_anchors`: each key in its path's
    third of the row), the last slot a spare that absorbs writes nobody reads.

    An anchor's operands are a pure function of its token id and the weights (module docstring), so they are kept per
    token id: `slot_of_token` (vocab + 1 ids, the last a spare) and `token_of_slot` map both ways (a slot is valid for
    a token only where they agree), and `last_use` (the pass counter `clock` at each slot's last use) picks the slots
    that new anchors take: the least recently used, never one read in the same pass (the table holds at least
    2 * max_num_seqs + fallback_rows slots). `misses` counts token rows that found their anchor nowhere
    (more new anchors in one pass than fallback rows; see `plan`); it stays 0 in every test.
    `fallback_rows` is `ANCHOR_FALLBACK_ROWS` where a sequence can start past position 0 (prefix caching, an external
    KV cache), else 0.
    """

    def __init__(self, layers: int, slots: int, heads: int, head_dim: int, vocab_size: int, fallback_rows: int) -> None:
        super().__init__()
        self.slots, self.vocab_size, self.fallback_rows = slots, vocab_size, fallback_rows
        # one buffer per layer and kind, not one stacked tensor: under torch.compile (torch 2.13) a write into a view of
        # a stacked buffer becomes a copy of the whole stack in every layer (0.37 s per step at the 0.5B shape on the
        # CPU, against 0.1 ms with a buffer per layer; vLLM's compiled decode ran at 0.35 of the plain backbone)
        for layer in range(layers):
            for kind, width in (("keys", 3 * head_dim), ("values", head_dim)):
                self.register_buffer(f"{kind}_{layer}", torch.zeros(slots + 1, heads, width), persistent=False)
        self.register_buffer("slot_of_token", torch.full((vocab_size + 1,), slots, dtype=torch.long), persistent=False)
        self.register_buffer("token_of_slot", torch.full((slots + 1,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("last_use", torch.zeros(slots + 1, dtype=torch.long), persistent=False)
        self.register_buffer("clock", torch.zeros(1, dtype=torch.long), persistent=False)
        self.register_buffer("misses", torch.zeros(1, dtype=torch.long), persistent=False)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (slots + 1, H_all, 3 D) keys and (slots + 1, H_all, D) values of decoder layer `index`."""
        return getattr(self, f"keys_{index}"), getattr(self, f"values_{index}")

    def clear(self) -> None:
        """Forget every anchor (the weights changed; `load_state`, so that an in-place reload forgets them too)."""
        for name, value in (("slot_of_token", self.slots), ("token_of_slot", -1), ("last_use", 0)):
            buffer = getattr(self, name)
            load_state(buffer, torch.full(buffer.shape, value, dtype=buffer.dtype))

    def plan(self, input_ids: torch.Tensor, positions: torch.Tensor, looked_up: torch.Tensor) -> tuple[AnchorPlan, torch.Tensor]:
        """The pass's `AnchorPlan` and the fallback rows' token ids, (fallback_rows,).

        A token's anchor id is its own id at position 0, else what the anchor lookup read (`looked_up`). Anchors in
        the table are read from it; the others are computed in this pass by a position-0 row of the batch with that
        id (a sequence's first prefill chunk) or, for the first row whose anchor has neither (a prefix-cache hit on
        an anchor the table no longer holds), by the fallback row. New anchors take the least recently used slots.
        """
        tokens = input_ids.shape[0]
        rows = torch.arange(tokens, device=input_ids.device)
        first = positions == 0
        anchor = torch.where(first, input_ids, looked_up)
        self.clock += 1
        slot = self.slot_of_token[anchor]
        known = self.token_of_slot[slot] == anchor
        self.last_use.index_put_((torch.where(known, slot, self.slots),), self.clock.expand(tokens))
        # the lowest position-0 row of each token id in the batch (`tokens` where there is none)
        owner = torch.full((self.vocab_size + 1,), tokens, dtype=torch.long, device=input_ids.device)
        owner.scatter_reduce_(0, torch.where(first, input_ids, self.vocab_size), rows, "amin")
        in_batch = owner[anchor] < tokens
        missing = ~known & ~in_batch
        if self.fallback_rows:
            first_missing = torch.argmax(missing.int(), dim=0, keepdim=True)  # (ANCHOR_FALLBACK_ROWS,)
            fallback_id, fallback_needed = anchor[first_missing], missing[first_missing]
            self.misses += (missing & (anchor != fallback_id)).sum()
            source = torch.where(in_batch, owner[anchor], tokens)  # the first fallback row otherwise
        else:
            fallback_id, fallback_needed = anchor[:0], missing[:0]
            self.misses += missing.sum()
            source = torch.where(in_batch, owner[anchor], rows)  # a miss (never expected here) reads its own row
        fallback_rows = torch.arange(tokens, tokens + self.fallback_rows, device=input_ids.device)
        # candidates: the position-0 rows (the lowest of each new id) and the fallback row
        inserts = torch.cat([first & (owner[input_ids] == rows) & ~known, fallback_needed])
        candidate_ids = torch.cat([input_ids, fallback_id])
        rank = (torch.cumsum(inserts.long(), 0) - 1).clamp(0, self.slots - 1)
        oldest = torch.argsort(self.last_use[: self.slots], stable=True)
        new_slot = torch.where(inserts, oldest[rank], self.slots)
        self.token_of_slot.index_put_((new_slot,), torch.where(inserts, candidate_ids, -1))
        self.slot_of_token.index_put_((torch.where(inserts, candidate_ids, self.vocab_size),), new_slot)
        self.last_use.index_put_((new_slot,), self.clock.expand(new_slot.shape[0]))
        plan = AnchorPlan(
            num_tokens=tokens,
            first=torch.cat([first, first.new_ones(self.fallback_rows)]),
            computes=torch.cat([first | missing, first.new_ones(self.fallback_rows)]),
            known=torch.cat([known, known.new_zeros(self.fallback_rows)]),
            slot=torch.cat([slot, slot.new_full((self.fallback_rows,), self.slots)]),
            source=torch.cat([source, fallback_rows]),
            new_slot=new_slot,
        )
        return plan, fallback_id


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
        self.register_buffer("bit_shifts", torch.arange(ANCHOR_ID_BITS), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        tokens = input_ids.shape[0]
        width = self.num_kv_heads * self.head_size
        query = torch.zeros(tokens, self.num_kv_heads, self.head_size, dtype=dtype, device=input_ids.device)
        query[..., 0] = 1
        key = torch.zeros_like(query)
        key[..., 0] = (positions == 0).to(dtype)[:, None]
        value = torch.zeros(tokens, width, dtype=dtype, device=input_ids.device)
        value[:, :ANCHOR_ID_BITS] = ((input_ids[:, None] >> self.bit_shifts) & 1).to(dtype)
        output = self.attn(query.view(tokens, width), key.view(tokens, width), value)
        bits = output[:, :ANCHOR_ID_BITS] > 0.5
        # rows past the scheduled tokens (padding) hold no result: keep their ids in range
        return (bits.long() << self.bit_shifts).sum(-1).clamp_(0, self.vocab_size - 1)


class PhantomVLLMAttention(PhantomAttentionMixin, nn.Module):
    """A decoder layer's attention with Phantom Dimension on vLLM's paged attention.

    The backbone's projections, q/k norms and rotary are vLLM layers loaded from the backbone's weights; the
    Phantom modules (`xattn_{query,key,value}_phantom`, `gating_phantom_{1,2}`) and the expansion and fold are
    `PhantomAttentionMixin`'s, the same code transformers runs. Without Phantom Dimension it is the backbone's
    attention. Under tensor parallelism this rank holds `num_heads` query and `num_kv_heads` key/value heads of
    the backbone's; the MHCA of each of them attends over all heads of the anchor (the operands are all-gathered).
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
        self.tp_size = get_tensor_model_parallel_world_size()
        self.num_heads = text.num_attention_heads // self.tp_size
        self.num_kv_heads = text.num_key_value_heads // self.tp_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.phantom = bool(config.phantom_dimension)
        self.layer_index = layer_index
        qkv_bias, o_bias, _, qk_norm = _backbone_biases(text)
        self.qkv_proj = QKVParallelLinear(
            text.hidden_size, self.head_dim, text.num_attention_heads, text.num_key_value_heads, bias=qkv_bias,
            quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            text.num_attention_heads * self.head_dim, text.hidden_size, bias=o_bias, quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
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
            if self.phantom_expansion == "mhca":
                self._register_path_mask(text.num_attention_heads, text.num_key_value_heads)
            self._register_derived_weights()
            self.anchor_rows_on_host = self.phantom_expansion == "mhca" and ANCHOR_ROWS_ON_HOST

    def _register_path_mask(self, heads: int, kv_heads: int) -> None:
        """This rank's rows of the fused MHCA's path mask (`PhantomAttentionMixin._phantom_mask`): its own q, k, v
        heads against the anchor heads of all ranks, and the order that puts all-gathered operands in the
        mixin's [q heads, k heads, v heads] layout."""
        path_of_anchor_head = torch.arange(3).repeat_interleave(torch.tensor([heads, kv_heads, kv_heads]))
        path_of_head = torch.arange(3).repeat_interleave(torch.tensor([self.num_heads, self.num_kv_heads, self.num_kv_heads]))
        other_path = path_of_head[:, None] != path_of_anchor_head[None, :]
        self.register_buffer(
            "path_mask", torch.zeros(other_path.shape).masked_fill(other_path, float("-inf")), persistent=False
        )
        local = self.num_heads + 2 * self.num_kv_heads
        # gathered: rank-major blocks of [q, k, v] heads; wanted: path-major blocks of rank-ordered heads
        order = [
            gathered_rank * local + offset + head
            for offset, count in ((0, self.num_heads), (self.num_heads, self.num_kv_heads), (self.num_heads + self.num_kv_heads, self.num_kv_heads))
            for gathered_rank in range(self.tp_size)
            for head in range(count)
        ]
        self.register_buffer("gathered_order", torch.tensor(order), persistent=False)

    def _phantom_mask(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.path_mask.to(dtype)

    def _register_derived_weights(self) -> None:
        """Buffers for the weights the mixin derives from the Phantom parameters (its stacked MHCA query weights and
        fold gate, the anchor side's [Lk; Lv] and Lo per path), filled by `refresh_derived_weights` when weights are
        loaded: a pass reads them instead of rebuilding them (in the compiled graph: two more kernels per layer)."""
        dim, shapes = self.head_dim, {}
        if self.phantom_expansion == "mhca":
            reference = self.xattn_query_phantom.linear_q.weight
            shapes["derived_query_weight"] = (3 * dim, dim)
            shapes["derived_anchor_key_value_weights"] = (3, 2 * dim, dim)
            shapes["derived_anchor_output_weights"] = (3, dim, dim)
        if self.phantom_mixing == "weighted":
            reference = self.gating_phantom_1.weight
            shapes["derived_gate_weight"] = (1, 2 * dim)
            shapes["derived_gate_bias"] = (1,)
        for name, shape in shapes.items():  # none for copies and a plain sum or mean
            self.register_buffer(name, torch.zeros(shape, dtype=reference.dtype, device=reference.device), persistent=False)

    @torch.no_grad()
    def refresh_derived_weights(self) -> None:
        """Recompute the derived-weight buffers from the Phantom parameters (after loading weights), unless those
        parameters were not among the weights just loaded (vLLM's in-place reload leaves them placeholders then)."""
        if any(parameter.is_meta for name, parameter in self.named_parameters() if "phantom" in name):
            return
        query_weight, gate_weight, gate_bias = PhantomAttentionMixin._phantom_derived_weights(self)
        values = {}
        if self.phantom_expansion == "mhca":
            key_value_weights, output_weights = zip(*PhantomAttentionMixin._phantom_anchor_weights(self))
            values["derived_query_weight"] = query_weight
            values["derived_anchor_key_value_weights"] = torch.stack(key_value_weights)
            values["derived_anchor_output_weights"] = torch.stack(output_weights)
        if self.phantom_mixing == "weighted":
            values["derived_gate_weight"], values["derived_gate_bias"] = gate_weight, gate_bias
        for name, value in values.items():
            load_state(getattr(self, name), value)

    def _phantom_derived_weights(self, cache: object = None) -> tuple[torch.Tensor | None, ...]:
        return (
            getattr(self, "derived_query_weight", None),
            getattr(self, "derived_gate_weight", None),
            getattr(self, "derived_gate_bias", None),
        )

    def _phantom_anchor_weights(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(zip(self.derived_anchor_key_value_weights, self.derived_anchor_output_weights))

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

    def _anchor_operands(
        self, states: tuple[torch.Tensor, ...], plan: AnchorPlan, table: PhantomAnchorTable
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused MHCA's anchor operands of every row, as `_phantom_expand` takes them: (rows, H_all, 3 D) keys
        and (rows, H_all, D) values.

        The rows at position 0 (and the fallback rows) compute their own operands, as `_phantom_anchors` computes
        them from the anchor's q/k/v (their q/k/v are their anchor's); new anchors are written to the table, and each
        token row takes its anchor's from the table or from the row that computes it in this pass. On a GPU every row
        computes them (fixed shapes for CUDA graphs; only the position-0 rows' are read); on the CPU, where the host
        is the device, `anchor_operands_at_position_zero` computes only the position-0 rows'.
        """
        features = tuple(state[:, :, 0] for state in states)
        if self.anchor_rows_on_host:
            own = torch.ops.phantom_hf.anchor_operands_at_position_zero(
                *features, plan.computes, self.derived_anchor_key_value_weights, self.derived_anchor_output_weights
            )
        else:
            own = self._phantom_anchor_operands(*features)
        if self.tp_size > 1:
            own = tuple(tensor_model_parallel_all_gather(part, dim=1)[:, self.gathered_order] for part in own)
        operands = []
        for stored, computed in zip(table.layer(self.layer_index), own):
            stored.index_put_((plan.new_slot,), computed)  # never a slot read in this pass (PhantomAnchorTable)
            operands.append(torch.where(plan.known[:, None, None], stored[plan.slot], computed[plan.source]))
        return operands[0], operands[1]

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, plan: AnchorPlan | None, table: PhantomAnchorTable | None
    ) -> torch.Tensor:
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
        operands = self._anchor_operands(states, plan, table) if plan is not None else None
        derived = self._phantom_derived_weights()
        expanded = self._phantom_expand("qkv", states, operands, derived)
        query, key, value = (state.reshape(rows, -1, 2 * dim) for state in expanded)
        if plan is None:
            output = self.attn(query.reshape(rows, -1), key.reshape(rows, -1), value.reshape(rows, -1))
            output = output.view(rows, self.num_heads, 2 * dim)
        else:
            tokens = plan.num_tokens
            # a row at position 0 (and a fallback row) sees only itself: its output is its own expanded value,
            # per query head's group; taken here so that an anchor's operands never depend on vLLM's batch layout
            own = value.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            attended = self.attn(
                query[:tokens].reshape(tokens, -1), key[:tokens].reshape(tokens, -1), value[:tokens].reshape(tokens, -1)
            ).view(tokens, self.num_heads, 2 * dim)
            if table.fallback_rows:
                attended = torch.cat([attended, own[tokens:]])
            output = torch.where(plan.first[:, None, None], own, attended)
        output, _ = self.o_proj(self._phantom_fold(output, derived).reshape(rows, self.q_size))
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
        plan: AnchorPlan | None,
        table: PhantomAnchorTable | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, plan, table)
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


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class PhantomLanguageModel(nn.Module):
    """The decoder stack (embeddings, layers, final norm) with Phantom Dimension, plus the anchor lookup and table.

    Its forward has no host synchronisation and no data-dependent shape (the anchors' rows are a fixed
    fallback rows more than the batch's tokens), so vLLM compiles it and captures CUDA graphs of it."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
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
        self.anchor_lookup: PhantomAnchorLookup | None = None
        self.anchor_table: PhantomAnchorTable | None = None
        if config.phantom_dimension and config.phantom_expansion == "mhca":
            tp_size = get_tensor_model_parallel_world_size()
            # vLLM orders cache layers by the one integer in their name: this one comes after the decoder layers
            self.anchor_lookup = PhantomAnchorLookup(
                text.num_key_value_heads // tp_size,
                2 * config.phantom_head_dim,
                text.vocab_size,
                cache_config,
                prefix=f"{prefix}.anchor_lookup.{text.num_hidden_layers}.attn",
            )
            starts_past_zero = bool(cache_config.enable_prefix_caching) or vllm_config.kv_transfer_config is not None
            fallback_rows = ANCHOR_FALLBACK_ROWS if starts_past_zero else 0
            slots = max(ANCHOR_TABLE_SIZE, 2 * vllm_config.scheduler_config.max_num_seqs + fallback_rows)
            self.anchor_table = PhantomAnchorTable(
                text.num_hidden_layers,
                slots,
                text.num_attention_heads + 2 * text.num_key_value_heads,
                config.phantom_head_dim,
                text.vocab_size,
                fallback_rows,
            )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.anchor_lookup is None:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            plan = None
        else:
            if input_ids is None:
                raise ValueError("Phantom Dimension needs the token ids of the batch to find each sequence's anchor")
            tokens = input_ids.shape[0]
            looked_up = self.anchor_lookup(input_ids, positions, self.norm.weight.dtype)
            plan, fallback_id = self.anchor_table.plan(input_ids, positions, looked_up)
            embedded = self.embed_input_ids(torch.cat([input_ids, fallback_id]))
            if inputs_embeds is not None:
                # position 0 is a text token (image-first prompts are refused): its embedding, whatever a padding
                # row of the batch holds, so that every position-0 row computes its token's anchor exactly
                first = plan.first[:tokens, None]
                embedded = torch.cat([torch.where(first, embedded[:tokens], inputs_embeds), embedded[tokens:]])
            hidden_states = embedded
            positions = torch.cat([positions, positions.new_zeros(self.anchor_table.fallback_rows)])
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, plan, self.anchor_table)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states if plan is None else hidden_states[: plan.num_tokens]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.anchor_table is not None:
            self.anchor_table.clear()  # computed from the weights these replace
        loaded = AutoWeightsLoader(self).load_weights(weights, mapper=_STACKED_WEIGHTS)
        for layer in self.layers:
            if layer.self_attn.phantom:
                layer.self_attn.refresh_derived_weights()
        return loaded


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
    """Refuse, with the reason, what this vLLM model does not run exactly. (Pipeline parallelism vLLM refuses
    itself: the model does not implement `SupportsPP`.)"""
    text = config.text_config
    tp_size = get_tensor_model_parallel_world_size()
    if text.num_attention_heads % tp_size or text.num_key_value_heads % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide the backbone's {text.num_attention_heads} attention heads and "
            f"{text.num_key_value_heads} key/value heads: Phantom's MHCA gathers every rank's heads of the anchor"
        )
    if config.phantom_dimension and config.phantom_anchor_token_id is not None:
        raise ValueError(
            f"phantom_anchor_token_id={config.phantom_anchor_token_id}: Phantom on vLLM takes the first token as the "
            "anchor; an anchor elsewhere depends on the tokens before it and is not supported"
        )
    _backbone_biases(text)


def _suppressed_token_ids(vllm_config: VllmConfig) -> list[int]:
    """Token ids the model never emits: `image_token_id` (a placeholder without its image cannot be embedded) and
    the `suppress_tokens` of the folder's generation_config.json, which transformers' `generate` applies and vLLM's
    sampling parameters do not carry."""
    config = vllm_config.model_config.hf_config
    suppressed = vllm_config.model_config.try_get_generation_config().get("suppress_tokens") or []
    vocab_size = config.text_config.vocab_size
    ids = sorted({int(token) for token in [config.image_token_id, *suppressed] if token is not None})
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
            self.language_model = PhantomLanguageModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model"))
        self.lm_head = ParallelLMHead(
            text.vocab_size, text.hidden_size, quant_config=vllm_config.quant_config, prefix=maybe_prefix(prefix, "lm_head")
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.language_model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.register_buffer("suppressed_token_ids", torch.tensor(_suppressed_token_ids(vllm_config), dtype=torch.long), persistent=False)

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
