"""Phantom vision-language models: Phantom Dimension attention, vision tower, projector and LLM.

Implements Phantom Dimension (arXiv 2409.14713, Sec. 3, Eq. 1-3) and the vision side (Sec. 4). Hub remote code: imports only torch, transformers and the
sibling files of this folder.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, DynamicCache, GenerationMixin, PreTrainedModel, StaticCache
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.utils import is_torchdynamo_compiling

from .cache_phantom import PhantomCache, PhantomCacheMixin, PhantomStaticCache, static_capacity
from .compat_phantom import CACHE_NAME, cache_kwargs, cache_of, take_cache
from .configuration_phantom import (
    AUTO_MAP,
    PHANTOM_GATE_MODULES,
    PHANTOM_MHCA_MODULES,
    PHANTOM_MODULE_NAMES,
    PhantomConfig,
    is_phantom_name,
    size_pair,
)
from .quantization_phantom import MODULES_NOT_QUANTIZED, PHANTOM_MODULES_NOT_QUANTIZED, keep_modules_unquantized
from .folder_phantom import write_folder

# ---------------------------------------------------------------------------------------------------
# Phantom Dimension (paper Sec. 3, Eq. 1-3)
# ---------------------------------------------------------------------------------------------------


class PhantomCrossAttention(nn.Module):
    """Multi-head cross-attention over heads (MHCA, paper Sec. 3, Eq. 1) from every head of every token to the
    anchor's heads.

    For x of shape (B, H, N, D) and anchor features a of shape (B, H_a, D):
    y = gelu(Lo(softmax(gelu(Lq(x)) @ gelu(Lk(a))^T / sqrt(D)) @ gelu(Lv(a)))), with exact (erf) GELU.

    `forward` is this formula for one module, written to be read: it is the reference that the tests hold
    the running code to. Phantom attention runs the three modules of a layer fused
    (`PhantomAttentionMixin._phantom_expand`), with the anchor-side products computed once per sequence
    (`PhantomAttentionMixin._phantom_anchors`; `anchor_states` is their reference form) and kept in the cache for decoding.
    """

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.linear_q = nn.Linear(head_dim, head_dim, bias=False)
        self.linear_k = nn.Linear(head_dim, head_dim, bias=False)
        self.linear_v = nn.Linear(head_dim, head_dim, bias=False)
        self.linear_o = nn.Linear(head_dim, head_dim, bias=False)

    def anchor_states(self, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gelu(Lk(a)), gelu(Lv(a))) for anchor features a of shape (B, H_a, D)."""
        return F.gelu(self.linear_k(anchor)), F.gelu(self.linear_v(anchor))

    def forward(self, states: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """MHCA(x, a) of shape (B, H, N, D) for x (B, H, N, D) and anchor features a (B, H_a, D)."""
        anchor_key, anchor_value = self.anchor_states(anchor)
        scores = torch.einsum("bhnd,bad->bhna", F.gelu(self.linear_q(states)), anchor_key) / self.head_dim**0.5
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(states.dtype)
        return F.gelu(self.linear_o(torch.einsum("bhna,bad->bhnd", probs, anchor_value)))


def sdpa_packed_gqa_decode(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA for one query token per row over grouped key/value heads, as transformers' `sdpa` interface
    computes it (output (B, 1, H, D_v), no weights), with the query heads of each key/value group packed
    into the query-length axis: (B, H, 1, D) -> (B, H_kv, H / H_kv, D).

    Every query head then reads its group's keys and values in place. transformers passes `enable_gqa`
    instead when no mask is needed (always, for an unpadded batch), and torch's CPU kernel repeats the keys
    and values per query head for it: on CPU the packed form takes 0.6-0.8 of that time at head size 64
    and 128, 256 to 4096 cached tokens (benchmarks/attention.py, BENCHMARKS.md). Used by Phantom attention
    for `sdpa` decode steps on CPU.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    query = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    if attention_mask is not None and attention_mask.shape[1] != 1:  # a per-head mask follows its head
        attention_mask = attention_mask.reshape(batch, kv_heads, heads // kv_heads, attention_mask.shape[-1])
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return output.reshape(batch, 1, heads, value.shape[-1]), None


def sdpa_attention_packed_decode(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered `sdpa` attention function, except decode steps on CPU over grouped key/value heads,
    which run `sdpa_packed_gqa_decode`. What Phantom attention calls for `sdpa`."""
    if query.device.type == "cpu" and query.shape[2] == 1 and key.shape[1] < query.shape[1]:
        return sdpa_packed_gqa_decode(module, query, key, value, attention_mask, **kwargs)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


# Values from which torch's oneDNN GELU beats ATen's on CPU (one thread, float32: 8.5 vs 5.4 us at 3456 values,
# 16.4 vs 17.2 us at 20736)
GELU_ONEDNN_MIN_NUMEL = 16384


def gelu_small(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, as `F.gelu`, for the MHCA's tensors (small at a decode step).

    On CPU, torch hands a contiguous float32/bfloat16 GELU to oneDNN, whose fixed cost per call (8 us in a hot loop,
    ~30 us between a layer's weight reads, against 3.5 us for ATen's own vectorised kernel on the 18 x 192 values of
    a 0.5B decode step) was the largest of Phantom's small operators. A transposed (non-contiguous) view of the same
    values takes ATen's kernel; the result is transposed back, contiguous. From `GELU_ONEDNN_MIN_NUMEL` values on
    (batches of decode rows, prefill) oneDNN is the faster and `F.gelu` is used (docs/design.md, "One fused MHCA").
    """
    if x.device.type != "cpu" or x.dim() < 2 or x.numel() >= GELU_ONEDNN_MIN_NUMEL:
        return F.gelu(x)
    rows = x.reshape(-1, x.shape[-1])
    return F.gelu(rows.t()).t().view(x.shape)


def softmax_in_float32(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` computed in float32 or wider, in the scores' dtype (the MHCA's, Eq. 1)."""
    if scores.dtype in (torch.float32, torch.float64):
        return torch.softmax(scores, dim=dim)
    return torch.softmax(scores, dim=dim, dtype=torch.float32).to(scores.dtype)


def phantom_anchor_operands(
    anchor_query: torch.Tensor,
    anchor_key: torch.Tensor,
    anchor_value: torch.Tensor,
    weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused MHCA's anchor operands (`PhantomAttentionMixin._phantom_anchors`) from the anchor's q, k, v,
    (B, H_path, D) per path, and per path the anchor side's weights ([Lk; Lv] of shape (2 D, D), Lo): one product
    with [Lk; Lv] gives both projections, and one with Lo the values (six products, not nine). Returns the
    (B, H_all, 3 D) keys, each in its path's third of the row, and the (B, H_all, D) values."""
    dim = anchor_query.shape[-1]
    keys, values = [], []
    for index, (features, (key_value_weight, output_weight)) in enumerate(zip((anchor_query, anchor_key, anchor_value), weights)):
        projected = F.gelu(F.linear(features, key_value_weight))  # [gelu(Lk(a)), gelu(Lv(a))]
        keys.append(F.pad(projected[..., :dim], (index * dim, (2 - index) * dim)))
        values.append(F.linear(projected[..., dim:], output_weight))
    return torch.cat(keys, dim=1), torch.cat(values, dim=1)


class PhantomAttentionMixin:
    """Phantom Dimension on top of a backbone attention module (paper Sec. 3, Eq. 1-3).

    `add_phantom_dimension` turns each decoder layer's attention into a subclass of its own class with
    this mixin first: the backbone's projections, q/k norms, rotary embedding, o_proj, GQA, sliding
    window, mask and attention interface (eager, sdpa, flash_attention_2) are reused as they are; this
    forward only adds the expansions to 2*head_dim, runs attention at the backbone's scale 1/sqrt(D),
    and folds the output back to head_dim. One exception to the reuse: sdpa decode steps on CPU run
    `sdpa_packed_gqa_decode` (via `sdpa_attention_packed_decode`), the same attention without torch's
    per-head copy of the keys/values.
    """

    _phantom_rotary: Callable
    _phantom_eager: Callable

    def init_phantom(self, config: PhantomConfig) -> None:
        """Add the Phantom modules (published names) and settings to this attention module.

        `phantom_mixing` and `phantom_expansion` decide which modules exist, so they are fixed here;
        `phantom_eta` is read from `config` (the model's config) at every call.
        """
        head_dim = self.head_dim
        text = self.config
        self.phantom_config = config
        self.phantom_num_heads = text.num_attention_heads
        self.phantom_num_kv_heads = text.num_key_value_heads
        self.phantom_mixing = config.phantom_mixing
        self.phantom_expansion = config.phantom_expansion
        # which projections the backbone has, looked up once (a missing nn.Module attribute raises on every lookup)
        self._phantom_fused_qkv = hasattr(self, "qkv_proj")
        self._phantom_qk_norm = hasattr(self, "q_norm")
        self._phantom_own_window = hasattr(self, "sliding_window")  # else the config says it (Phi-3)
        self._phantom_path_mask: torch.Tensor | None = None
        if self.phantom_expansion == "mhca":
            for name in PHANTOM_MHCA_MODULES.values():  # xattn_{query,key,value}_phantom
                setattr(self, name, PhantomCrossAttention(head_dim))
        if self.phantom_mixing == "weighted":
            for name in PHANTOM_GATE_MODULES:  # gating_phantom_1, gating_phantom_2
                setattr(self, name, nn.Linear(head_dim, 1))

    def _phantom_project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The backbone's q, k, v of shape (B, H, N, D), before rotary."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        if self._phantom_fused_qkv:
            q_size = self.phantom_num_heads * self.head_dim
            kv_size = self.phantom_num_kv_heads * self.head_dim
            query, key, value = self.qkv_proj(hidden_states).split([q_size, kv_size, kv_size], dim=-1)
        else:
            query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
        if self._phantom_qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def _phantom_anchors(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, anchor_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The anchor-side operands of the fused MHCA (`_phantom_expand`), from each row's anchor features.

        The anchor features are q, k, v (rotary applied) at the anchor position of each row. Per path
        (q, k, v) the anchor keys are gelu(Lk(a)) and the anchor values Lo(gelu(Lv(a))) — Lo is linear, so
        Lo(s @ va) = s @ Lo(va). Both are concatenated over the paths' heads; each anchor key is placed in its
        path's third of a 3*D row, zeros elsewhere, so that one product with [Lq_q; Lq_k; Lq_v] applied to every
        head gives each head the scores of its own path (`_phantom_expand`). Two tensors, (B, H_q + 2 H_kv, 3 D)
        keys and (B, H_q + 2 H_kv, D) values, all that the cache keeps for decoding.
        """
        if anchor_index is None:
            raise ValueError(
                "Phantom attention needs the anchor position of each row (`phantom_anchor_index`); call "
                "PhantomModel or PhantomForConditionalGeneration rather than the bare language model."
            )
        rows = torch.arange(query.shape[0], device=query.device)
        anchor_index = anchor_index.to(query.device)
        return self._phantom_anchor_operands(*(states[rows, :, anchor_index] for states in (query, key, value)))

    def _phantom_anchor_operands(
        self, anchor_query: torch.Tensor, anchor_key: torch.Tensor, anchor_value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_phantom_anchors`' operands from the anchor features themselves (`phantom_anchor_operands`)."""
        return phantom_anchor_operands(anchor_query, anchor_key, anchor_value, self._phantom_anchor_weights())

    def _phantom_anchor_weights(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per path (q, k, v), the weights of the anchor side of its MHCA: [Lk; Lv] of shape (2 D, D), and Lo."""
        weights = []
        for path in "qkv":
            mhca = getattr(self, PHANTOM_MHCA_MODULES[path])
            weights.append((torch.cat([mhca.linear_k.weight, mhca.linear_v.weight]), mhca.linear_o.weight))
        return tuple(weights)

    def _phantom_mask(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(H_all, H_all) additive mask of the fused MHCA: 0 where a head and an anchor head belong to the same
        path (q, k or v), -inf elsewhere; H_all = H_q + 2 H_kv. Built once per dtype and device."""
        mask = self._phantom_path_mask
        if mask is None or mask.dtype != dtype or mask.device != device:
            sizes = torch.tensor([self.phantom_num_heads, self.phantom_num_kv_heads, self.phantom_num_kv_heads])
            path_of_head = torch.arange(3).repeat_interleave(sizes)
            other_path = path_of_head[:, None] != path_of_head[None, :]
            mask = torch.zeros(other_path.shape, dtype=dtype).masked_fill(other_path, float("-inf")).to(device)
            self._phantom_path_mask = mask
        return mask

    def _phantom_derived_weights(
        self, cache: PhantomCacheMixin | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Weights the fused expansion and fold use, derived from the Phantom modules' parameters:

        - the MHCA query weights of the q, k and v paths stacked, [Lq_q; Lq_k; Lq_v] of shape (3 D, D) (MHCA
          expansion), so that one matrix product projects the heads of all paths;
        - the fold's gate as one linear layer on [O1, O2] (weighted mixing): weight [w1, -w2] of shape (1, 2 D)
          and bias b1 - b2, since Eq. 3's weight e^f / (e^f + e^g) = sigmoid(f - g) needs only f - g.

        Built at every call (two concatenations per layer), except at inference with a Phantom cache, which keeps
        them with the anchors, computed from the same parameters at its prefill: its decode steps read them there.
        The model keeps no copy between calls: a parameter written through `.data` (PEFT's merge, weight syncs) leaves
        nothing that a staleness check could read, its version counter included.
        """
        reuse = not torch.is_grad_enabled() and not is_torchdynamo_compiling()
        if reuse and cache is not None:
            kept = cache.derived_weights.get(self.layer_idx)
            if kept is not None:
                return kept
        tensors: list[torch.Tensor] = []
        if self.phantom_expansion == "mhca":
            tensors += [getattr(self, name).linear_q.weight for name in PHANTOM_MHCA_MODULES.values()]
        if self.phantom_mixing == "weighted":
            first, second = self.gating_phantom_1, self.gating_phantom_2
            tensors += [first.weight, second.weight, first.bias, second.bias]
        query_weight = torch.cat(tensors[:3]) if self.phantom_expansion == "mhca" else None
        gate_weight = gate_bias = None
        if self.phantom_mixing == "weighted":
            weight_1, weight_2, bias_1, bias_2 = tensors[-4:]
            gate_weight, gate_bias = torch.cat([weight_1, -weight_2], dim=1), bias_1 - bias_2
        derived = (query_weight, gate_weight, gate_bias)
        if reuse and cache is not None:
            cache.derived_weights[self.layer_idx] = derived
        return derived

    def _phantom_expand(
        self,
        paths: str,
        states: tuple[torch.Tensor, ...],
        anchors: tuple[torch.Tensor, torch.Tensor] | None,
        derived: tuple[torch.Tensor | None, ...],
    ) -> tuple[torch.Tensor, ...]:
        """[x, x*] along the head dimension for each path, x* = eta*MHCA(x, anchor) (+ x on the value path).

        `paths` names the paths of `states` ("qkv", "kv" or "q"; (B, H_path, N, D) tensors of the same N);
        `anchors` are `_phantom_anchors`' operands. For one token (a decode step, where the number of
        operators is the cost) the MHCAs of all given paths run as one: the heads of every path are stacked and
        projected by all three paths' Lq at once; each head attends over the stacked anchor heads, whose keys sit
        in their own path's third of the projection, with the other paths masked out: about ten operators per
        layer. For more tokens (prefill, where the arithmetic is the cost) each path runs on its own, with the
        paper's arithmetic. The results are views of one (B, H_all, N, 2 D) tensor.
        `PhantomCrossAttention.forward` is the same computation for one path, unfused.
        """
        if self.phantom_expansion == "repeat":
            return tuple(torch.cat([x, x], dim=-1) for x in states)
        if paths not in ("qkv", "kv", "q"):
            raise ValueError(f"Phantom expansion paths must be 'qkv', 'kv' or 'q', got {paths!r}")
        batch, _, tokens, dim = states[0].shape
        sizes = [x.shape[1] for x in states]
        start = 0 if paths[0] == "q" else self.phantom_num_heads
        stop = start + sum(sizes)
        key, value = anchors
        # the one-token form's path mask, built here at prefill so that a compiled decode step only reads it; sliced
        # only for a subset of the paths (under vLLM's tensor parallelism it is this rank's heads x all anchor heads)
        mask = self._phantom_mask(key.dtype, key.device)
        if paths != "qkv":
            key, value, mask = key[:, start:stop], value[:, start:stop], mask[start:stop, start:stop]
        stacked = torch.cat(states, dim=1) if len(states) > 1 else states[0]
        query_weight, _, _ = derived
        if tokens == 1:  # decode: one product with all three Lq; each head's scores read its own path's third
            hidden = gelu_small(F.linear(stacked, query_weight).reshape(batch, -1, 3 * dim))
            scores = torch.baddbmm(mask, hidden, key.transpose(1, 2), alpha=dim**-0.5)
            probs = softmax_in_float32(scores)
            expansion = torch.bmm(probs, value)
        else:  # prefill: path by path, without the decode form's products across paths (3x the Lq work per token)
            parts, first = [], 0
            for path, x in zip(paths, states):
                third, heads = slice("qkv".index(path) * dim, ("qkv".index(path) + 1) * dim), x.shape[1]
                hidden = F.gelu(F.linear(x, query_weight[third])).reshape(batch, -1, dim)  # rows (head, token)
                # scores with the anchor heads first, (B, H_path, rows): the softmax over the few anchor heads then runs
                # along dim 1, which CPU kernels vectorise over the rows (15x faster than over a last dim of 14 or 2)
                scores = torch.bmm(key[:, first : first + heads, third], hidden.transpose(1, 2)).mul_(dim**-0.5)
                probs = softmax_in_float32(scores, dim=1)
                parts.append(torch.bmm(probs.transpose(1, 2), value[:, first : first + heads]))
                first += heads
            expansion = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        expansion = gelu_small(expansion).mul_(self.phantom_config.phantom_eta).view(batch, -1, tokens, dim)
        if paths[-1] == "v":  # v* = v + eta * MHCA(v, a)
            expansion[:, -sizes[-1] :].add_(stacked[:, -sizes[-1] :])
        return torch.cat([stacked, expansion], dim=-1).split(sizes, dim=1)

    def _phantom_fold(self, output: torch.Tensor, derived: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        """Fold the (B, N, H, 2D) attention output back to (B, N, H, D) (Eq. 3 or an ablation).

        `derived` (here and in `_phantom_expand`): `_phantom_derived_weights()`, taken once per layer call by the
        caller."""
        first, second = output[..., : self.head_dim], output[..., self.head_dim :]
        if self.phantom_mixing == "sum":
            return first + second
        if self.phantom_mixing == "mean":
            return (first + second) / 2
        # Eq. 3: w = e^f / (e^f + e^g) = sigmoid(f - g), f - g one linear layer on [O1, O2]; lerp gives w*O1 + (1-w)*O2
        _, gate_weight, gate_bias = derived
        return torch.lerp(second, first, torch.sigmoid(F.linear(output, gate_weight, gate_bias)))

    def _phantom_attention_interface(self) -> Callable:
        implementation = self.config._attn_implementation
        if implementation in (None, "eager"):
            return self._phantom_eager
        if implementation == "sdpa":
            return sdpa_attention_packed_decode
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, self._phantom_eager)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        phantom_anchor_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        past_key_values = take_cache(cache, past_key_values)  # decoder layers pass `cache` from transformers 5.24 on
        input_shape = hidden_states.shape[:-1]
        query, key, value = self._phantom_project(hidden_states)
        cos, sin = position_embeddings
        query, key = self._phantom_rotary(query, key, cos, sin)

        cache = past_key_values if isinstance(past_key_values, PhantomCacheMixin) else None
        anchors = cache.get_anchors(self.layer_idx) if cache is not None else None
        if anchors is None and self.phantom_expansion == "mhca":
            anchors = self._phantom_anchors(query, key, value, phantom_anchor_index)
            if cache is not None:
                cache.set_anchors(self.layer_idx, *anchors)

        derived = self._phantom_derived_weights(cache)
        if cache is not None and cache.mode == "compact":
            key, value = cache.update(key, value, self.layer_idx)
            key, value = self._phantom_expand("kv", (key, value), anchors, derived)
            (query,) = self._phantom_expand("q", (query,), anchors, derived)
        else:
            query, key, value = self._phantom_expand("qkv", (query, key, value), anchors, derived)
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)

        sliding_window = self.sliding_window if self._phantom_own_window else getattr(self.config, "sliding_window", None)
        attn_output, attn_weights = self._phantom_attention_interface()(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,  # 1/sqrt(D) of the backbone, not 1/sqrt(2D): Eq. 2 with lambda = sqrt(2)
            sliding_window=sliding_window,
            **kwargs,
        )
        attn_output = self._phantom_fold(attn_output, derived).reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


_PHANTOM_ATTENTION_CLASSES: dict[type, type] = {}


def phantom_attention_class(base_class: type) -> type:
    """`Phantom<Base>`: the backbone attention class with `PhantomAttentionMixin` in front (cached)."""
    if base_class in _PHANTOM_ATTENTION_CLASSES:
        return _PHANTOM_ATTENTION_CLASSES[base_class]
    backbone_module = sys.modules[base_class.__module__]
    rotary = getattr(backbone_module, "apply_rotary_pos_emb", None)
    eager = getattr(backbone_module, "eager_attention_forward", None)
    if rotary is None or eager is None:
        raise ValueError(
            f"cannot wrap {base_class.__name__}: its module {base_class.__module__} has no "
            "apply_rotary_pos_emb/eager_attention_forward"
        )
    name = f"Phantom{base_class.__name__}"
    phantom_class = type(
        name,
        (PhantomAttentionMixin, base_class),
        {"_phantom_rotary": staticmethod(rotary), "_phantom_eager": staticmethod(eager), "__module__": __name__},
    )
    globals()[name] = phantom_class  # importable by name, so models stay picklable
    _PHANTOM_ATTENTION_CLASSES[base_class] = phantom_class
    return phantom_class


def add_phantom_dimension(language_model: nn.Module, config: PhantomConfig) -> list[nn.Module]:
    """Give every decoder layer of `language_model` (a `…Model` decoder stack) Phantom Dimension, in place.

    The backbone's parameters are kept as they are; the new modules are created on the device and dtype
    of each layer's o_proj. Returns the attention modules that were converted.
    """
    converted = []
    for index, layer in enumerate(language_model.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is None:
            raise ValueError(f"decoder layer {index} ({type(layer).__name__}) has no `self_attn` to wrap")
        if isinstance(attention, PhantomAttentionMixin):
            raise ValueError(f"decoder layer {index} already has Phantom Dimension")
        attention.__class__ = phantom_attention_class(type(attention))
        reference = attention.o_proj.weight
        attention.init_phantom(config)
        for name, child in attention.named_children():
            if name in PHANTOM_MODULE_NAMES:
                child.to(device=reference.device, dtype=reference.dtype)
        converted.append(attention)
    return converted


# ---------------------------------------------------------------------------------------------------
# Vision side (InternVL's, paper Sec. 4)
# ---------------------------------------------------------------------------------------------------


class PhantomProjector(InternVLMultiModalProjector):
    """Pixel shuffle (ratio `downsample_ratio`) + LayerNorm + Linear + GELU + Linear, as InternVL's."""

    def __init__(self, config: PhantomConfig) -> None:
        super().__init__(config)
        self.downsample_ratio = config.downsample_ratio

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        tiles, tokens, _ = vision_features.shape
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"pixel shuffle needs a square grid of vision tokens, got {tokens} per tile")
        grid = vision_features.reshape(tiles, side, side, -1)
        shuffled = InternVLModel.pixel_shuffle(self, grid, scale_factor=self.downsample_ratio)
        return super().forward(shuffled.reshape(tiles, -1, shuffled.shape[-1]))


class XDPProjector(nn.Module):
    """Xmodel-VLM's XDP projector (arXiv 2405.09215): every `projector_group_size` consecutive vision tokens
    are concatenated into one ((B, T, C) -> (B, T/g, gC), 75% fewer tokens for g = 4), then
    Linear(gC, d) -> Mish -> Linear(d, d)."""

    def __init__(self, config: PhantomConfig) -> None:
        super().__init__()
        self.group_size = config.projector_group_size
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * self.group_size, hidden)
        self.act = nn.Mish()
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        tiles, tokens, channels = vision_features.shape
        if tokens % self.group_size:
            raise ValueError(f"XDP groups {self.group_size} tokens at a time; {tokens} vision tokens per image do not divide")
        grouped = vision_features.reshape(tiles, tokens // self.group_size, self.group_size * channels)
        return self.linear_2(self.act(self.linear_1(grouped)))


class MLP2xGeluProjector(LlavaMultiModalProjector):
    """LLaVA-1.5's `mlp2x_gelu`: Linear(C, d) -> GELU -> Linear(d, d) on every vision token."""


PROJECTOR_CLASSES = {"phantom": PhantomProjector, "xdp": XDPProjector, "mlp2x_gelu": MLP2xGeluProjector}


# ---------------------------------------------------------------------------------------------------
# Outputs, the remote-code files, the base class (loading, saving, quantization, anchors)
# ---------------------------------------------------------------------------------------------------


@dataclass
class PhantomModelOutputWithPast(BaseModelOutputWithPast):
    """Decoder outputs, plus the projected vision tokens of this call's images (num_tiles, tokens, hidden)."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class PhantomCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Language-modelling outputs of `PhantomForConditionalGeneration`, plus the projected vision tokens."""

    image_hidden_states: torch.FloatTensor | None = None


MODELING_FILES = (
    "compat_phantom.py",
    "configuration_phantom.py",
    "cache_phantom.py",
    "folder_phantom.py",
    "modeling_phantom.py",
    "processing_phantom.py",
    "presets_phantom.py",
    "quantization_phantom.py",
)

def save_remote_code(folder: str | Path) -> None:
    """Copy the remote-code files (`MODELING_FILES`) into `folder`, next to the weights."""
    source = Path(__file__).parent
    for name in MODELING_FILES:
        if (source / name).is_file():
            (Path(folder) / name).write_text((source / name).read_text())


class PhantomPreTrainedModel(PreTrainedModel):
    config_class = PhantomConfig
    config: PhantomConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # decode steps with a static cache (PhantomStaticCache): tests/test_static_cache.py
    # Modules weight quantization leaves in the compute dtype (quantization_phantom.py says why).
    _phantom_modules_not_quantized = PHANTOM_MODULES_NOT_QUANTIZED
    _modules_not_quantized = MODULES_NOT_QUANTIZED

    def enable_input_require_grads(self) -> None:
        """Make the language model's input embeddings require grad (activation checkpointing or adapters on a
        frozen LLM need it). Only the LLM's: transformers' default also hooks the vision tower's patch
        embeddings, which makes a frozen tower (training stage 1) run its backward for nothing."""

        def make_inputs_require_grads(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(make_inputs_require_grads)
        self._require_grads_hooks = [self._require_grads_hook]

    @classmethod
    def phantom_quantization_config(cls, quantization_config: Any) -> Any:
        """A copy of `quantization_config` whose module skip list (`llm_int8_skip_modules` of bitsandbytes,
        `modules_to_not_convert` of torchao and the others) keeps this class's modules unquantized: all of
        `_modules_not_quantized` when the config names none, else the config's list plus the Phantom modules.
        Configs without a skip list are returned as they are. `from_pretrained` applies it."""
        return keep_modules_unquantized(quantization_config, cls._modules_not_quantized, cls._phantom_modules_not_quantized)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`, with a `quantization_config` completed by `phantom_quantization_config`
        (the Phantom modules, vision tower, projector and `lm_head` stay in the compute dtype by default), refusing
        weights that do not fit the config (see `_check_loaded_weights`)."""
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = cls.phantom_quantization_config(kwargs["quantization_config"])
        output_loading_info = kwargs.pop("output_loading_info", False)
        override = kwargs.get("phantom_dimension")
        try:
            model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except Exception as error:
            safetensors = sys.modules.get("safetensors")  # imported by transformers whenever it reads safetensors
            if not isinstance(error, getattr(safetensors, "SafetensorError", ())):
                raise
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(f"{_unreadable_weights(source)} cannot be read ({error})") from error
        _check_loaded_weights(model, loading_info, override if isinstance(override, bool) else None)
        return (model, loading_info) if output_loading_info else model

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """Save weights and config, plus the remote-code files, so the folder loads with `trust_remote_code`.
        (No model card: whoever publishes the folder writes one, e.g. `phantom_hf.hub.push_folder`.)

        The folder is written whole beside `save_directory` and swapped in with one rename (`write_folder`): a save
        that fails midway (a full disk, an error while writing, a killed process) leaves the folder's previous model
        as it was, and two saves into one folder at once end as one model or the other. Files of the folder that the
        save does not write (a tokenizer, a model card, training checkpoints) are kept; weight files of an earlier
        save are replaced as a set. Staging needs room for a second copy of the weights while saving.
        """
        self.config.auto_map = dict(AUTO_MAP)
        main_process = kwargs.get("is_main_process", True) if not args else args[0]
        if not main_process:
            super().save_pretrained(save_directory, *args, **kwargs)
            return
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", Path(save_directory).name)  # not the staging folder's name

        def write(folder: Path) -> None:
            super(PhantomPreTrainedModel, self).save_pretrained(folder, *args, **kwargs)
            save_remote_code(folder)

        write_folder(save_directory, write)


def unreadable_weight_files(source: Any) -> list[tuple[str, BaseException]]:
    """The safetensors files of folder `source` that do not open (truncated or corrupt), in name order, each with its
    error; none where `source` is not a local folder (a Hub id). Used by `from_pretrained`'s error and by the CLI's
    check of a folder before loading it."""
    safetensors = sys.modules["safetensors"]  # imported by transformers' modeling_utils, which this module imports
    folder = Path(str(source))
    broken = []
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safetensors.safe_open(str(path), framework="pt"):
                pass
        except (safetensors.SafetensorError, OSError) as error:
            broken.append((str(path), error))
    return broken


def _unreadable_weights(source: Any) -> str:
    """What `from_pretrained`'s error names: the unreadable weight files of `source`, else its weights."""
    broken = [path for path, _ in unreadable_weight_files(source)]
    if not broken:
        return f"the weights of {source}"
    return f"weights file {broken[0]}" + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else "") + ", truncated or corrupt,"


def _attended_tokens(attention_mask: Any, batch_size: int) -> torch.Tensor | None:
    """(B, N) bool: which tokens of the call are attended, from a 2D padding mask or a prepared 4D mask.

    A 4D mask (B or 1, heads, N, kv) is what `generate` passes with a static cache; a token is attended when
    it may attend to itself (the mask's diagonal: keys and queries start together at a prefill). Boolean
    masks allow with True, additive ones with 0 (not the dtype's minimum or -inf). A dict of masks per layer
    type (sliding and full attention) has the same diagonal in each. None: every token is attended.
    """
    if isinstance(attention_mask, dict):
        attention_mask = next((mask for mask in attention_mask.values() if isinstance(mask, torch.Tensor)), None)
    if not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dim() == 2:
        return attention_mask.bool()
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be 2D (batch, tokens) or 4D, got shape {tuple(attention_mask.shape)}")
    diagonal = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
    if diagonal.dtype != torch.bool:
        diagonal = diagonal > torch.finfo(diagonal.dtype).min
    return diagonal.expand(batch_size, -1)


def anchor_positions(
    input_ids: torch.Tensor | None,
    attention_mask: Any,
    anchor_token_id: int | None,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Position of each row's anchor (paper Sec. 3): the first attended token, or the first attended
    occurrence of `anchor_token_id` when one is configured. `attention_mask` as the model takes it: 2D, 4D,
    or None."""
    attended = _attended_tokens(attention_mask, batch_size)
    if anchor_token_id is None:
        if attended is None:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        empty = ~attended.any(-1)
        if empty.any():
            raise ValueError(f"attention_mask rows {empty.nonzero().flatten().tolist()} attend to no token")
        return attended.int().argmax(-1)
    if input_ids is None:
        raise ValueError("phantom_anchor_token_id needs input_ids to find the anchor; got only inputs_embeds")
    hits = input_ids == anchor_token_id
    if attended is not None:
        hits &= attended.to(hits.device)
    missing = ~hits.any(-1)
    if missing.any():
        raise ValueError(
            f"phantom_anchor_token_id={anchor_token_id} does not occur in rows {missing.nonzero().flatten().tolist()}"
        )
    return hits.int().argmax(-1)


# ---------------------------------------------------------------------------------------------------
# Input validation: a clear ValueError naming the tensor and the bound instead of an IndexError deep in
# torch or a silently wrong output. Each check is one small function. The token-id check costs one host
# sync per forward (17 us on a CPU decode step); generate's decode steps skip it, the other checks read
# shapes only.
# ---------------------------------------------------------------------------------------------------


def _check_token_ids(input_ids: torch.Tensor, num_embeddings: int, image_token_id: int | None) -> int:
    """Check that `input_ids` is a non-empty (batch, length) tensor of ids in 0..num_embeddings-1; return the
    number of image placeholders it holds (computed in the same host sync as the bounds)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got a {input_ids.dtype} tensor")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, sequence_length), got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): the model needs at least one token per row")
    placeholder = -1 if image_token_id is None else image_token_id
    low, high, placeholders = torch.stack([input_ids.min(), input_ids.max(), (input_ids == placeholder).sum()]).tolist()
    if low < 0 or high >= num_embeddings:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids holds token id {bad}, outside the vocabulary of {num_embeddings} tokens (ids 0..{num_embeddings - 1})"
        )
    return int(placeholders)


def _check_labels(labels: torch.Tensor, shape: tuple[int, int], vocab_size: int, ignore_index: int = -100) -> None:
    """`labels` must have the (batch, length) of the input and hold ids in 0..vocab_size-1 or `ignore_index`."""
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of token ids, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels has shape {tuple(labels.shape)} but the input has shape {tuple(shape)}; they must match")
    invalid = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if invalid.any():
        bad = int(labels[invalid][0])
        raise ValueError(
            f"labels holds {bad}, neither a token id of the vocabulary of {vocab_size} tokens (0..{vocab_size - 1}) nor "
            f"the ignored index {ignore_index}"
        )


def _check_attention_mask(attention_mask: Any, batch: int, length: int, past_length: int, cache: Any = None) -> None:
    """A 2D `attention_mask` covers the cached tokens and the new ones of every row, or with a static cache all of
    its slots (the fixed-shape mask a compiled decode step takes); a 4D one has the batch size."""
    if not isinstance(attention_mask, torch.Tensor):
        return  # None, or a dict of prepared masks
    if attention_mask.dim() not in (2, 4):
        raise ValueError(f"attention_mask must have shape (batch, length), got {tuple(attention_mask.shape)}")
    if attention_mask.shape[0] != batch:
        raise ValueError(f"attention_mask has batch size {attention_mask.shape[0]} but the input has {batch} rows")
    if attention_mask.dim() != 2 or attention_mask.shape[1] == past_length + length:
        return
    capacity = static_capacity(cache)  # looked up only here: decode steps with the usual mask never need it
    if attention_mask.shape[1] != capacity:
        slots = f" (or the static cache's {capacity} slots)" if capacity is not None else ""
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} tokens, but the cache holds {past_length} and the input adds "
            f"{length}: it must cover all {past_length + length}{slots}"
        )


def _check_pixel_values(pixel_values: torch.Tensor, vision_config: Any) -> None:
    """Tiles of the vision tower's size and channels, with finite values."""
    if not isinstance(pixel_values, torch.Tensor) or not torch.is_floating_point(pixel_values):
        raise TypeError(f"pixel_values must be a floating-point tensor, got {getattr(pixel_values, 'dtype', type(pixel_values))}")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have shape (num_tiles, channels, height, width), got {tuple(pixel_values.shape)}")
    height, width = size_pair(vision_config.image_size)
    expected = (getattr(vision_config, "num_channels", 3), height, width)
    if tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values holds tiles of shape {tuple(pixel_values.shape[1:])} but this model's vision tower takes "
            f"{expected} (channels, image_size); prepare the images with the model's processor"
        )
    if not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values holds NaN or infinite values")


def _check_loaded_weights(model: nn.Module, loading_info: dict[str, Any], phantom_dimension_override: bool | None) -> None:
    """Weights the config has no place for, or weights of the config the checkpoint lacks, are an error at load time
    (transformers only warns: a config with fewer layers than the checkpoint drops weights silently, one with more
    layers runs random ones).

    Two mismatches are asked for by name and allowed: `phantom_dimension=True` on a checkpoint without Phantom modules
    (paper Table 5, "+Phantom Dimension": the new modules start near a no-op), and `phantom_dimension=False` on one
    with them (the backbone alone).
    """
    children = {name for name, _ in model.named_children()}  # weights of another head (lm_head for PhantomModel) are not ours
    unexpected = sorted(name for name in loading_info.get("unexpected_keys") or [] if name.split(".")[0] in children)
    missing = sorted(loading_info.get("missing_keys") or [])
    if phantom_dimension_override is False:
        unexpected = [name for name in unexpected if not is_phantom_name(name)]
    if phantom_dimension_override is True:
        missing = [name for name in missing if not is_phantom_name(name)]
    if unexpected:
        raise ValueError(
            f"the checkpoint holds {len(unexpected)} weight(s) this config has no place for, e.g. {unexpected[:3]}: the "
            "config does not match the weights (fewer layers? pass phantom_dimension=False to drop Phantom modules)"
        )
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} weight(s) of this config, e.g. {missing[:3]}: the config does not match "
            "the weights (more layers? pass phantom_dimension=True to add new Phantom modules to a baseline)"
        )


def _checked_tile_index(image_tile_index: Any, tiles: int) -> torch.Tensor:
    """`image_tile_index` as a 1-D integer tensor of tiles in [0, tiles), or a ValueError/TypeError saying what is wrong."""
    if not isinstance(image_tile_index, torch.Tensor) or image_tile_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"image_tile_index must be an int64 tensor, got {getattr(image_tile_index, 'dtype', type(image_tile_index))}")
    if image_tile_index.dim() != 1:
        raise ValueError(f"image_tile_index must be 1-D (one entry per placeholder tile), got shape {tuple(image_tile_index.shape)}")
    if image_tile_index.numel() and (int(image_tile_index.min()) < 0 or int(image_tile_index.max()) >= tiles):
        raise ValueError(f"image_tile_index holds tiles outside [0, {tiles}): {image_tile_index.tolist()}")
    return image_tile_index


def _foreign_cache_error(cache: Cache) -> ValueError:
    return ValueError(
        f"the cache is a {type(cache).__name__} holding {int(cache.get_seq_length())} tokens; Phantom attention "
        "needs a PhantomCache or PhantomStaticCache (they keep the anchors and the expanded keys/values). Pass "
        "PhantomCache(config=model.config.text_config), PhantomStaticCache(model.config.text_config, "
        "max_cache_len), or no cache."
    )


# ---------------------------------------------------------------------------------------------------
# The models: the vision tower, projector and decoder stack (`PhantomModel`), and with the LM head and
# `generate` (`PhantomForConditionalGeneration`)
# ---------------------------------------------------------------------------------------------------


class PhantomModel(PhantomPreTrainedModel):
    """Vision tower + projector + decoder stack with Phantom Dimension (no LM head)."""

    def __init__(self, config: PhantomConfig) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = PROJECTOR_CLASSES[config.projector_type](config)
        # The projector in use is kept whole by `device_map` and, with the backbones' decoder and vision layers (added
        # by `post_init` from the sub-models), is a wrap unit of FSDP's default transformer policy. Only classes the
        # model holds: accelerate < 1.16 refuses a name it cannot find in the model.
        self._no_split_modules = [type(self.multi_modal_projector).__name__]
        self.language_model = AutoModel.from_config(config.text_config)
        if config.phantom_dimension:
            config.validate_attn_implementation(config.text_config._attn_implementation)
            add_phantom_dimension(self.language_model, config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected vision tokens of shape (num_tiles, image_seq_length, hidden) for tiles (num_tiles, 3, H, W)."""
        _check_pixel_values(pixel_values, self.config.vision_config)
        layer = self.config.vision_feature_layer
        outputs = self.vision_tower(pixel_values=pixel_values.to(self.vision_tower.dtype), output_hidden_states=layer != -1)
        features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def _merge_image_features(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        image_token_id = self.config.image_token_id
        if input_ids is not None:
            mask = input_ids == image_token_id
        else:
            placeholder = self.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == placeholder).all(-1)
        n_placeholders = int(mask.sum())
        n_features = image_features.shape[0] * image_features.shape[1]
        if n_placeholders != n_features:
            raise ValueError(
                f"the text has {n_placeholders} image placeholder tokens (id {image_token_id}) but pixel_values gives "
                f"{image_features.shape[0]} tiles x {image_features.shape[1]} = {n_features} vision tokens"
            )
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_features)

    def _check_num_patches(
        self, input_ids: torch.Tensor | None, pixel_values: torch.Tensor, num_patches: torch.Tensor | list[int]
    ) -> None:
        """Tiles per image must add up to `pixel_values`, and the processor must have expanded each tile into
        `config.image_seq_length` placeholders (a processor built for another vision tower is reported here)."""
        tiles = int(sum(int(count) for count in num_patches))
        if tiles != pixel_values.shape[0]:
            raise ValueError(f"num_patches adds up to {tiles} tiles but pixel_values holds {pixel_values.shape[0]}")
        if input_ids is None or tiles == 0:
            return
        placeholders = int((input_ids == self.config.image_token_id).sum())
        per_tile = self.config.image_seq_length
        if placeholders != tiles * per_tile and placeholders % tiles == 0:
            raise ValueError(
                f"the processor expanded each of the {tiles} tiles into {placeholders // tiles} image placeholders, but "
                f"this model makes config.image_seq_length = {per_tile} vision tokens per tile; build the processor "
                f"with image_seq_length={per_tile} (PhantomProcessor.from_config(model.config, tokenizer))"
            )

    def _phantom_cache(self, cache: Cache | None, use_cache: bool, cache_mode: str | None) -> Cache | None:
        """The cache Phantom attention runs with: a `PhantomCache` or `PhantomStaticCache`, created, or converted
        from an empty `DynamicCache` / `StaticCache` (what `generate` creates for `cache_implementation` None /
        "dynamic" / "static")."""
        mode = cache_mode or self.config.phantom_cache_mode
        if cache is None:
            return PhantomCache(config=self.config.text_config, mode=mode) if use_cache else None
        if isinstance(cache, PhantomCacheMixin):
            return cache
        if type(cache) is DynamicCache and cache.get_seq_length() == 0:
            return PhantomCache(config=self.config.text_config, mode=mode)
        if type(cache) is StaticCache and int(cache.get_seq_length()) == 0:
            return PhantomStaticCache.from_static_cache(cache, mode=mode)
        raise _foreign_cache_error(cache)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        phantom_cache_mode: str | None = None,
        image_features: torch.FloatTensor | None = None,
        num_patches: torch.LongTensor | list[int] | None = None,
        past_key_values: Cache | None = None,
        image_tile_index: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> PhantomModelOutputWithPast:
        """Run the decoder on text whose `<IMG_CONTEXT>` embeddings are replaced by the vision tokens.

        `pixel_values` holds the tiles of all images in the batch, in the order of their placeholders;
        `image_features` may be given instead (precomputed `get_image_features`). `image_tile_index` lets
        rows share encoded tiles: the i-th tile of placeholders takes the vision tokens of tile
        `image_tile_index[i]` of `pixel_values` / `image_features`, so each tile goes through the vision tower
        once however many rows use it (a preference batch of chosen rows then rejected rows on the same images:
        `torch.arange(tiles).repeat(2)`). `num_patches` (tiles per image, from `PhantomProcessor`) is only
        checked against `pixel_values` and the placeholders. The cache may be passed as `cache` (the name since
        transformers 5.24) or `past_key_values` (before).
        """
        cache = take_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        if use_cache is None:
            use_cache = not self.training and self.config.text_config.use_cache
        if self.config.phantom_dimension:
            cache = self._phantom_cache(cache, use_cache, phantom_cache_mode)
        if image_tile_index is not None and pixel_values is None and image_features is None:
            raise ValueError("image_tile_index selects tiles of pixel_values or image_features; neither was given")

        # A decoding step of `generate` feeds the token the model just chose (never a placeholder): checking its
        # range would cost a host sync per step, which generate otherwise avoids on accelerators. A compiled step
        # holds no data-dependent check at all (it would break the graph).
        compiling = is_torchdynamo_compiling()
        decode_step = kwargs.pop("phantom_decode_step", False)
        past_length = int(cache.get_seq_length()) if cache is not None and not compiling else 0
        placeholders = 0
        if input_ids is not None and not decode_step and not compiling:
            embeddings = self.get_input_embeddings().num_embeddings
            placeholders = _check_token_ids(input_ids, embeddings, self.config.image_token_id)
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if not compiling:
            _check_attention_mask(attention_mask, batch, length, past_length, cache)
            capacity = None if decode_step else static_capacity(cache)  # generate checked its decode steps up front
            if capacity is not None and past_length + length > capacity:
                raise ValueError(
                    f"the static cache has room for {capacity} tokens but this call needs {past_length + length} "
                    f"({past_length} cached + {length} new): create it with a larger max_cache_len"
                )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            if num_patches is not None and image_tile_index is None:
                self._check_num_patches(input_ids, pixel_values, num_patches)
            image_features = self.get_image_features(pixel_values)
        if image_features is not None:
            tile_features = image_features
            if image_tile_index is not None:
                tile_features = image_features[_checked_tile_index(image_tile_index, image_features.shape[0])]
            inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, tile_features)
        elif placeholders:
            raise ValueError(
                f"the text has {placeholders} image placeholder tokens but no pixel_values"
                + (f" (the cache holds {past_length} tokens: pass the pixel_values of the images in the new text)" if past_length else "")
            )

        needs_anchors = self.config.phantom_dimension and self.config.phantom_expansion == "mhca"
        if needs_anchors and not (isinstance(cache, PhantomCacheMixin) and cache.has_anchors()):
            anchor_index = anchor_positions(
                input_ids, attention_mask, self.config.phantom_anchor_token_id, inputs_embeds.shape[0], inputs_embeds.device
            )
            kwargs["phantom_anchor_index"] = anchor_index
            if isinstance(cache, PhantomCacheMixin) and input_ids is not None and not compiling:
                cache.anchor_tokens = input_ids.gather(1, anchor_index[:, None].to(input_ids.device))[:, 0]
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **cache_kwargs(cache),
            **kwargs,
        )
        return PhantomModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **cache_kwargs(cache_of(outputs) if use_cache else None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


# ---------------------------------------------------------------------------------------------------
# Generation glue: which tiles a continued cache still needs, image tokens never generated, the checks of
# `generate`'s inputs. `PhantomForConditionalGeneration.generate`, `prepare_inputs_for_generation` and
# `_expand_inputs_for_generation` use them.
# ---------------------------------------------------------------------------------------------------


def _tiles_of_new_text(
    all_ids: torch.Tensor,
    new_ids: torch.Tensor,
    tiles: torch.Tensor,
    num_patches: torch.Tensor | list[int] | None,
    config: PhantomConfig,
) -> tuple[torch.Tensor, torch.Tensor | list[int] | None]:
    """The tiles (pixel_values or image features, one entry per tile) of the placeholders in `new_ids`, the part of
    `all_ids` (each row's whole text) that a filled cache has not seen, and the matching `num_patches`.

    `tiles` as given when they cover exactly the new placeholders; the trailing tiles of each row when they cover the
    placeholders of the whole text (ordered by row, as the processor gives them); otherwise unchanged, for the
    model's count check to report.
    """
    per_tile = config.image_seq_length
    new_counts = (new_ids == config.image_token_id).sum(-1).tolist()
    if sum(new_counts) == tiles.shape[0] * per_tile or new_ids.shape == all_ids.shape:
        return tiles, num_patches
    all_counts = (all_ids == config.image_token_id).sum(-1).tolist()
    if sum(all_counts) != tiles.shape[0] * per_tile:
        return tiles, num_patches
    if any(count % per_tile for count in new_counts):
        raise ValueError(
            "the cache ends inside an image's placeholder tokens: continue a conversation after a whole turn, "
            "not in the middle of an image"
        )
    keep = torch.zeros(tiles.shape[0], dtype=torch.bool)
    start = 0
    for total, new in zip(all_counts, new_counts):
        start += total // per_tile
        keep[start - new // per_tile : start] = True
    if num_patches is not None:
        counts = [int(count) for count in num_patches]
        bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
        kept = [keep[lo:hi].all().item() for lo, hi in zip(bounds[:-1], bounds[1:])]
        if any(keep[lo:hi].any().item() and not whole for lo, hi, whole in zip(bounds[:-1], bounds[1:], kept)):
            raise ValueError("num_patches does not split the tiles of the new text into whole images")
        counts = [count for count, whole in zip(counts, kept) if whole]
        num_patches = torch.tensor(counts, dtype=torch.long) if isinstance(num_patches, torch.Tensor) else counts
    return tiles[keep.to(tiles.device)], num_patches


def _with_image_tokens(tokens: list[int] | None, image_token_id: int | None) -> list[int] | None:
    """`tokens` (ids to suppress in generation) with the image placeholder added."""
    tokens = list(tokens or [])
    if image_token_id is not None and image_token_id not in tokens:
        tokens.append(image_token_id)
    return tokens or None


def _check_generate_inputs(config: PhantomConfig, input_ids: Any, kwargs: dict[str, Any]) -> None:
    """What `generate` must refuse before it starts: an empty prompt, right padding, and an assistant model that
    cannot read this model's images."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: generate needs a prompt of at least one token per row")
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[1] > 0:
        padded = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        if padded:
            raise ValueError(
                f"rows {padded} of attention_mask end with padding: generate continues each row after its last position, "
                "so batched prompts must be padded on the left (tokenizer.padding_side = 'left')"
            )
    assistant = kwargs.get("assistant_model")
    images = kwargs.get("pixel_values") is not None or kwargs.get("image_features") is not None
    if assistant is not None and images:
        assistant_config = getattr(assistant, "config", None)
        same = getattr(assistant_config, "model_type", None) == config.model_type and all(
            getattr(assistant_config, name, None) == getattr(config, name)
            for name in ("image_token_id", "image_seq_length")
        )
        if not same:
            raise ValueError(
                f"assisted generation with images needs an assistant that reads the same images: a Phantom model with "
                f"image_token_id={config.image_token_id} and image_seq_length={config.image_seq_length}; got "
                f"{type(assistant).__name__}"
            )


def _check_generate_cache(config: PhantomConfig, input_ids: Any, kwargs: dict[str, Any], defaults: Any) -> None:
    """A cache given to `generate` must fit the prompt, before anything runs: a filled cache is continued, never
    reset, so the prompt must be the conversation it holds plus new tokens (longer than what it holds, with the same
    anchor token in every row); Phantom attention needs a Phantom cache; a static cache must have room for the prompt
    and the new tokens (`defaults`: the model's generation config, for settings not in `kwargs`)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, Cache) or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return
    held, prompt = int(cache.get_seq_length()), input_ids.shape[1]
    if held and config.phantom_dimension and not isinstance(cache, PhantomCacheMixin):
        raise _foreign_cache_error(cache)
    if held and prompt <= held:
        raise ValueError(
            f"the cache already holds {held} tokens but the prompt has {prompt}: generate continues the conversation a "
            "filled cache holds (it never resets it), so input_ids must be that whole conversation followed by new "
            "tokens. For another prompt pass a new cache, or call cache.reset() first"
        )
    anchor_tokens = getattr(cache, "anchor_tokens", None)
    if held and anchor_tokens is not None:
        if anchor_tokens.shape[0] != input_ids.shape[0]:
            raise ValueError(f"the cache holds {anchor_tokens.shape[0]} rows but the prompt has {input_ids.shape[0]}")
        index = anchor_positions(
            input_ids, kwargs.get("attention_mask"), config.phantom_anchor_token_id, input_ids.shape[0], input_ids.device
        )
        tokens = input_ids.gather(1, index[:, None])[:, 0]
        differ = (tokens != anchor_tokens.to(tokens.device)).nonzero().flatten().tolist()
        if differ:
            raise ValueError(
                f"rows {differ} of the prompt do not continue the conversation the cache holds: their anchor token is "
                f"{tokens[differ].tolist()}, the cache's {anchor_tokens[differ].tolist()}. Pass a new cache, or call "
                "cache.reset() first"
            )
    capacity = static_capacity(cache)
    if capacity is not None:
        settings = kwargs.get("generation_config") or defaults
        new = kwargs.get("max_new_tokens", getattr(settings, "max_new_tokens", None))
        if new is None:
            new = kwargs.get("max_length", getattr(settings, "max_length", None) or prompt) - prompt
        if prompt + new > capacity:
            raise ValueError(
                f"the static cache has room for {capacity} tokens but this generate needs {prompt + new} ({prompt} of "
                f"prompt + {new} new): create it with max_cache_len >= {prompt + new}"
            )


class PhantomForConditionalGeneration(PhantomPreTrainedModel, GenerationMixin):
    """Phantom vision-language model with a language-modelling head: `forward` (with `labels` for the
    loss) and `generate` with every decoding strategy, using `PhantomCache` by default and `PhantomStaticCache`
    with `cache_implementation="static"`, whose decode step compiles in one graph (`torch.compile(...,
    fullgraph=True)`, or `generate`'s own compile path on an accelerator)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: PhantomConfig) -> None:
        super().__init__(config)
        self.model = PhantomModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        if self.generation_config is not None:  # saved with the model: other runtimes never sample a placeholder either
            self.generation_config.suppress_tokens = _with_image_tokens(
                self.generation_config.suppress_tokens, config.image_token_id
            )

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> nn.Module:
        return self.model.multi_modal_projector

    @classmethod
    def from_components(
        cls,
        language_model: PreTrainedModel,
        vision_model: PreTrainedModel | None = None,
        **config_overrides: Any,
    ) -> "PhantomForConditionalGeneration":
        """Wrap a pretrained `…ForCausalLM` (and vision model) into a Phantom model.

        Their modules and weights are reused as they are (not copied); the projector and the Phantom
        modules are new and freshly initialised, in the LLM's dtype and on its device. Pass a pretrained
        vision model (e.g. `AutoModel.from_pretrained(...)` of a vision tower, or the `vision_tower` of a
        loaded InternVL/LLaVA model) as `vision_model`: without it, a tower with random weights is built from
        `vision_config` (an override, or InternViT-300M-448px: 304M parameters), with a warning. Other keyword
        arguments override `PhantomConfig` fields.
        """
        if not isinstance(language_model, PreTrainedModel) or language_model.get_output_embeddings() is None:
            raise TypeError(
                f"language_model must be a transformers …ForCausalLM with an LM head, got {type(language_model).__name__}"
            )
        decoder = getattr(language_model, language_model.base_model_prefix, None)
        if decoder is None or not hasattr(decoder, "layers"):
            raise TypeError(f"{type(language_model).__name__} has no decoder stack with `layers` to wrap")
        vision_config = config_overrides.pop("vision_config", None)
        if vision_model is not None:
            vision_config = vision_model.config
        config = PhantomConfig(text_config=decoder.config, vision_config=vision_config, **config_overrides)
        config.tie_word_embeddings = getattr(language_model.config, "tie_word_embeddings", False)
        with torch.device("meta"):
            model = cls(config)
        reference = language_model.get_output_embeddings().weight
        if vision_model is None:
            vision_model = AutoModel.from_config(copy.deepcopy(config.vision_config))
            vision_model.to(device=reference.device)
            warnings.warn(
                f"from_components: no vision_model was given, so the vision tower ({type(vision_model).__name__}, "
                f"{sum(parameter.numel() for parameter in vision_model.parameters()):,} parameters) has random "
                "weights; pass a pretrained vision model as vision_model=",
                UserWarning,
                stacklevel=2,
            )
        model.model.vision_tower = vision_model
        model.model.language_model = decoder
        model.lm_head = language_model.get_output_embeddings()
        projector = PROJECTOR_CLASSES[config.projector_type](config)
        model.model.multi_modal_projector = projector.to(device=reference.device, dtype=reference.dtype)
        new_modules = [projector]
        if config.phantom_dimension:
            new_modules += add_phantom_dimension(decoder, config)
        for root in new_modules:
            for name, module in root.named_modules():
                if root is projector or is_phantom_name(name):
                    model._init_weights(module)
        if language_model.generation_config is not None:
            model.generation_config = copy.deepcopy(language_model.generation_config)
            model.generation_config.suppress_tokens = _with_image_tokens(
                model.generation_config.suppress_tokens, config.image_token_id
            )
        leftover = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
        if leftover:
            raise RuntimeError(f"from_components left tensors unmaterialised: {leftover[:5]}")
        return model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_patches: torch.LongTensor | list[int] | None = None,
        phantom_cache_mode: str | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> PhantomCausalLMOutputWithPast:
        """Logits (and the LM loss with `labels`). `phantom_cache_mode` ("expanded" | "compact") overrides the
        config for the cache this call creates, e.g. `model.generate(..., phantom_cache_mode="compact")`. The
        cache may be passed as `cache` (the name since transformers 5.24) or `past_key_values` (before)."""
        tokens = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and tokens is not None:
            _check_labels(labels, tokens.shape[:2], self.config.text_config.vocab_size, kwargs.get("ignore_index", -100))
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            num_patches=num_patches,
            phantom_cache_mode=phantom_cache_mode,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=take_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return PhantomCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_kwargs(cache_of(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """transformers' `generate`, with Phantom's inputs checked up front: an empty prompt, right padding (each
        row continues after its last position, so a right-padded row would continue after its padding) and an
        assistant model that cannot read the images are refused. Image placeholder tokens are never generated
        (added to `suppress_tokens`): a placeholder without its image cannot be embedded."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        _check_generate_inputs(self.config, input_ids, kwargs)
        _check_generate_cache(self.config, input_ids, kwargs, self.generation_config)
        image_token_id = self.config.image_token_id
        if "suppress_tokens" in kwargs:
            kwargs["suppress_tokens"] = _with_image_tokens(kwargs["suppress_tokens"], image_token_id)
        elif kwargs.get("generation_config") is not None:
            if image_token_id not in (kwargs["generation_config"].suppress_tokens or []):
                kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
                kwargs["generation_config"].suppress_tokens = _with_image_tokens(
                    kwargs["generation_config"].suppress_tokens, image_token_id
                )
        elif image_token_id not in (self.generation_config.suppress_tokens or []):
            kwargs["suppress_tokens"] = _with_image_tokens(self.generation_config.suppress_tokens, image_token_id)
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any
    ) -> dict[str, Any]:
        """Images are encoded when their placeholders are fed: at the prefill, which may continue a filled cache
        (a later turn of a conversation, with new images); decoding steps read their effect from the cache.

        When a filled cache is continued, `pixel_values` (or `image_features`) may hold the tiles of the new text
        only, or of the whole conversation (what the processor gives for the full chat): the tiles of the images
        already in the cache are then left out.
        """
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        cache = model_inputs.get(CACHE_NAME)
        if cache is None or cache.get_seq_length() == 0:
            # nothing cached: the text's placeholders need their images, also in an assistant's first call, which
            # transformers 5.24 prepares as a later iteration and drops `pixel_values` from
            for name in ("pixel_values", "image_features"):
                if kwargs.get(name) is not None:
                    model_inputs[name] = kwargs[name]
            return model_inputs
        new_ids = model_inputs.get("input_ids")
        if not is_first_iteration and new_ids is not None and new_ids.shape[1] == 1:
            model_inputs["phantom_decode_step"] = True
        for name in ("pixel_values", "image_features"):
            if model_inputs.get(name) is None:
                continue
            if not is_first_iteration:  # a decoding step: the images are in the cache already
                model_inputs.pop(name)
                continue
            if new_ids is not None:
                model_inputs[name], num_patches = _tiles_of_new_text(
                    input_ids, new_ids, model_inputs[name], model_inputs.get("num_patches"), self.config
                )
                if "num_patches" in model_inputs:
                    model_inputs["num_patches"] = num_patches
        return model_inputs

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: torch.LongTensor | None = None, **model_kwargs: Any
    ) -> tuple[torch.LongTensor | None, dict[str, Any]]:
        """Repeat each row's tiles as a group ([A1, A2, B] -> [A1, A2, A1, A2, B, B]) for beams and
        `num_return_sequences`; the default repeat-interleave of single tiles would misplace multi-tile images."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1 and input_ids is not None:
            tiles_per_row = (input_ids == self.config.image_token_id).sum(-1) // self.config.image_seq_length
            if int(tiles_per_row.sum()) == pixel_values.shape[0]:
                groups = pixel_values.split(tiles_per_row.tolist())
                pixel_values = torch.cat([group for group in groups for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs


__all__ = [
    "PhantomCrossAttention",
    "PhantomAttentionMixin",
    "PhantomProjector",
    "PhantomPreTrainedModel",
    "PhantomModel",
    "PhantomForConditionalGeneration",
    "add_phantom_dimension",
    "anchor_positions",
    "save_remote_code",
]
