"""The Phantom-Dimension caches: `PhantomCache` (dynamic, the default) and `PhantomStaticCache` (for compiled decoding).

Hub remote code: imports only torch and transformers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer
from transformers.utils import is_torchdynamo_compiling

from .configuration_phantom import PHANTOM_CACHE_MODES


def _check_growth(growth: float, min_spare: int) -> None:
    if not growth >= 1.0 or min_spare < 0:
        raise ValueError(f"the cache buffers need growth >= 1 and min_spare >= 0, got growth={growth}, min_spare={min_spare}")


class BufferedDynamicLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in preallocated buffers with spare room for new tokens.

    `DynamicLayer.update` appends with `torch.cat`, which copies the whole cache of the layer at every
    decode step: a per-step cost that grows with the context (and doubles for Phantom's expanded
    keys/values of head size 2*head_dim). This layer writes the new tokens in place into buffers of
    shape (B, H, capacity, D) and returns views of the filled part, so a step copies only its own
    tokens. When a write does not fit, the buffers are reallocated with capacity
    `ceil(need * growth) + min_spare` tokens: geometric growth, so a token is copied 1 / (growth - 1)
    times on average over the life of the cache (4 at the default 1.25) instead of once per step, and
    the buffers hold at most `growth` times the filled tokens plus `min_spare` (a regrowth briefly holds
    the old and the new buffers of one layer, as a `torch.cat` does).

    `keys` / `values` are always views of exactly the filled tokens, `buffer[:, :, :length, :]`:
    the last dimension stays contiguous, which SDPA and flash attention read in place (measured on CPU:
    no hidden copy, same speed as a contiguous tensor). Code that assigns new tensors to `keys` /
    `values` (as the base class's offloading does) keeps working: the layer adopts them as its buffers
    and reallocates on the next write. In-place writes happen only into buffers the layer allocated
    itself with autograd off; with autograd recording (a key that requires grad) it falls back to
    concatenation, so it never overwrites a tensor that a backward pass may need.

    `crop` keeps the capacity (assisted decoding crops and regrows by a few tokens per step).
    """

    def __init__(self, growth: float = 1.25, min_spare: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_growth(growth, min_spare)
        self.growth = growth
        self.min_spare = min_spare
        self._clear_buffers()

    def _clear_buffers(self) -> None:
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._length = 0
        self._owned = False  # True when the buffers were allocated here and may be written in place
        self._views: tuple[Any, Any] = (None, None)

    def _set_views(self) -> None:
        """Point `keys` / `values` at the filled part of the buffers."""
        self.keys = self._key_buffer[..., : self._length, :]
        self.values = self._value_buffer[..., : self._length, :]
        self._views = (self.keys, self.values)

    def _sync(self) -> None:
        """Adopt tensors that other code assigned to `keys` / `values` since `_set_views`."""
        if self.keys is self._views[0] and self.values is self._views[1]:
            return
        if self.keys is None or self.values is None or self.keys.dim() != 4:
            self._key_buffer = self._value_buffer = None
            self._length = 0
        else:
            self._key_buffer, self._value_buffer = self.keys, self.values
            self._length = self.keys.shape[-2]
        self._owned = False
        self._views = (self.keys, self.values)

    @property
    def capacity(self) -> int:
        """Tokens the buffers can hold before the next reallocation."""
        self._sync()
        return 0 if self._key_buffer is None else self._key_buffer.shape[-2]

    def _capacity_for(self, need: int) -> int:
        return math.ceil(need * self.growth) + self.min_spare

    def _fits(self, key_states: torch.Tensor, value_states: torch.Tensor, need: int) -> bool:
        buffer = self._key_buffer
        return (
            self._owned
            and buffer is not None
            and need <= buffer.shape[-2]
            and buffer.shape[:2] == key_states.shape[:2]
            and buffer.shape[-1] == key_states.shape[-1]
            and self._value_buffer.shape[-1] == value_states.shape[-1]
            and buffer.dtype == key_states.dtype
            and buffer.device == key_states.device
            and (torch.is_inference_mode_enabled() or not buffer.is_inference())
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens after the filled part (in place when they fit); return keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._sync()
        length, need = self._length, self._length + key_states.shape[-2]
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            if length:
                key_states = torch.cat([self._key_buffer[..., :length, :], key_states], dim=-2)
                value_states = torch.cat([self._value_buffer[..., :length, :], value_states], dim=-2)
            self._key_buffer, self._value_buffer, self._owned = key_states, value_states, False
        else:
            if not self._fits(key_states, value_states, need):
                self._key_buffer, self._value_buffer = self._grown(key_states, value_states, need)
                self._owned = True
            self._key_buffer[..., length:need, :].copy_(key_states)
            self._value_buffer[..., length:need, :].copy_(value_states)
        self._length = need
        self._set_views()
        return self.keys, self.values

    def _grown(self, key_states: torch.Tensor, value_states: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New buffers with room for `need` tokens and spare, holding a copy of the filled part."""
        capacity = self._capacity_for(need)
        buffers = []
        for new, old in ((key_states, self._key_buffer), (value_states, self._value_buffer)):
            buffer = new.new_empty((*new.shape[:2], capacity, new.shape[-1]))
            if self._length:
                buffer[..., : self._length, :].copy_(old[..., : self._length, :])
            buffers.append(buffer)
        return buffers[0], buffers[1]

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        self._sync()
        return self._length

    def _map_buffers(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch operation to the whole buffers (spare room included: one pass, no regrowth after)."""
        self._sync()
        if self._length == 0:
            return
        old = self._key_buffer.untyped_storage().data_ptr()
        self._key_buffer, self._value_buffer = fn(self._key_buffer), fn(self._value_buffer)
        fresh = self._key_buffer.untyped_storage().data_ptr() != old
        self._owned = (fresh or self._owned) and not self._key_buffer.requires_grad
        self._set_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_buffers(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_buffers(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_buffers(lambda t: t[indices, ...])

    def crop(self, *args: Any, **kwargs: Any) -> None:
        """`DynamicLayer.crop` (its argument rules for the installed transformers), keeping the buffers."""
        self._sync()
        super().crop(*args, **kwargs)
        if self.keys is not self._views[0]:  # the base class sliced the published views
            self._length = self.keys.shape[-2]
            self._set_views()

    def reset(self) -> None:
        """Drop the buffers: the next update starts an empty layer (like `DynamicLayer.reset` in 5.x)."""
        self.keys = self.values = None
        self.is_initialized = False
        self._clear_buffers()
        super().reset()

    def offload(self) -> None:
        """Move the whole buffers (spare room included) to the CPU, so writes stay in place after `prefetch`."""
        self._move_buffers("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            self._move_buffers(self.device)

    def _move_buffers(self, device: torch.device | str) -> None:
        self._sync()
        if not self.is_initialized or self._key_buffer is None:
            return
        self._key_buffer = self._key_buffer.to(device, non_blocking=True)
        self._value_buffer = self._value_buffer.to(device, non_blocking=True)
        self._set_views()


def _check_mode(mode: str) -> None:
    if mode not in PHANTOM_CACHE_MODES:
        raise ValueError(f"PhantomCache mode must be 'expanded' or 'compact', got {mode!r}")


def static_capacity(cache: Any) -> int | None:
    """Tokens a static cache can hold (its smallest full-attention layer; sliding-window layers roll over), or
    None for caches that grow."""
    if not isinstance(cache, StaticCache):
        return None
    sizes = [layer.max_cache_len for layer in cache.layers if not getattr(layer, "is_sliding", False)]
    return min(sizes) if sizes else None


class PhantomCacheMixin:
    """What Phantom attention keeps in a cache besides keys and values: the mode, and each row's anchor operands.

    The anchors of a layer are two tensors with the batch in dimension 0, computed once per sequence at prefill
    from the anchor token's q, k, v (paper Sec. 3, Eq. 1): the keys gelu(Lk(a)) and the values Lo(gelu(Lv(a)))
    of the layer's three cross-attentions, their heads concatenated: (B, H_q + 2 H_kv, 3 D) keys, each in its path's
    third of the row (`PhantomAttentionMixin._phantom_anchors`), and (B, H_q + 2 H_kv, D) values. That is all a
    decode step reads; the raw anchor features are not kept. Every batch operation of the cache moves the
    anchors with the rows.
    """

    mode: str
    # (B,) id of each row's anchor token, recorded at prefill when the rows were given as token ids, or None: lets
    # `generate` refuse a prompt that does not continue the conversation the cache holds. Beam reorders leave it
    # as it is (they move rows among the beams of one prompt, which share their anchor token).
    anchor_tokens: torch.Tensor | None = None
    # per layer, the weights Phantom attention derives from its parameters (`_phantom_derived_weights`), kept at
    # inference with the anchors, which the same parameters gave at prefill; forgotten with the anchors
    derived_weights: dict[int, tuple]

    def get_anchors(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (key, value) anchor operands of `layer_idx` set at prefill, or None before."""
        raise NotImplementedError

    def set_anchors(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        raise NotImplementedError

    def has_anchors(self) -> bool:
        """Whether a prefill has set anchors (decode steps then read them instead of looking for the anchor)."""
        raise NotImplementedError


class PhantomCache(PhantomCacheMixin, DynamicCache):
    """A `DynamicCache` that also keeps, per layer, the anchor operands of each row (`PhantomCacheMixin`).

    In `"expanded"` mode (the default) the key/value tensors it stores are the Phantom-expanded ones,
    [k, k*] and [v, v*], of head size 2*head_dim: a decode step computes the expansions of its new
    tokens only, so Phantom Dimension costs O(1) extra work per step. The price is a key/value cache
    twice the size of the backbone's. In `"compact"` mode it stores the plain k and v (the backbone's
    size) and the attention recomputes the expansions of all cached tokens every step (O(N) extra).

    In both modes the full-attention layers are `BufferedDynamicLayer`s: new tokens are written in place
    into buffers with spare room (`growth`, `min_spare`) instead of `torch.cat`-copying the whole cache
    every step as `DynamicLayer` does; `layer.keys` / `layer.values` show only the filled tokens. Sliding-
    window and other special layers keep transformers' own classes. Every batch operation of the cache
    (beam reorder, repeat-interleave, select, reset, crop to empty) moves the anchors with the rows.
    For `torch.compile` and CUDA graphs use `PhantomStaticCache`.
    """

    def __init__(self, *args: Any, mode: str = "expanded", growth: float = 1.25, min_spare: int = 64, **kwargs: Any) -> None:
        _check_mode(mode)
        _check_growth(growth, min_spare)
        super().__init__(*args, **kwargs)
        make_layer = functools.partial(BufferedDynamicLayer, growth=growth, min_spare=min_spare)
        self.layers = [self._buffered(layer, make_layer) for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = make_layer
        self.mode = mode
        self.anchors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.derived_weights = {}

    @staticmethod
    def _buffered(layer: Any, make_layer: Callable[[], BufferedDynamicLayer]) -> Any:
        """A full-attention `DynamicLayer` as a `BufferedDynamicLayer` with the same contents; others as they are."""
        if type(layer) is not DynamicLayer:
            return layer
        buffered = make_layer()
        if layer.get_seq_length() > 0:
            buffered.update(layer.keys, layer.values)
        return buffered

    def get_anchors(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.anchors.get(layer_idx)

    def set_anchors(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.anchors[layer_idx] = (key, value)

    def has_anchors(self) -> bool:
        return bool(self.anchors)

    def _map_anchors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.anchors = {layer_idx: (fn(key), fn(value)) for layer_idx, (key, value) in self.anchors.items()}
        if self.anchor_tokens is not None:
            self.anchor_tokens = fn(self.anchor_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_anchors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_anchors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_anchors(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def _forget_anchors(self) -> None:
        """Forget the rows' anchors and what was kept with them (the cache holds no sequence any more)."""
        self.anchors.clear()
        self.derived_weights.clear()
        self.anchor_tokens = None

    def crop(self, *args: Any, **kwargs: Any) -> None:
        super().crop(*args, **kwargs)
        if self.get_seq_length() == 0:
            self._forget_anchors()

    def reset(self) -> None:
        super().reset()
        self._forget_anchors()


class PhantomStaticCache(PhantomCacheMixin, StaticCache):
    """A `StaticCache` (preallocated keys/values of `max_cache_len` tokens, written in place: what `torch.compile`
    and CUDA graphs need) that also keeps each row's anchor operands in preallocated buffers (`PhantomCacheMixin`).

    `mode` as `PhantomCache`'s: "expanded" stores [k, k*], [v, v*] (head size 2*head_dim, twice the backbone's
    static cache), "compact" the plain k, v, re-expanding all `max_cache_len` slots every step. The anchor
    buffers are allocated at the first prefill, marked as static addresses, and rewritten in place by later
    prefills and beam reorders, so a compiled decode step reads them at a fixed address. Phantom models convert
    an empty `StaticCache` into this class by themselves: `generate(..., cache_implementation="static")`
    works as it does for transformers' own models.

    Why per-row buffers and not anchors held by the model: at inference a row's anchor is usually its first
    attended token at position 0, which under causal attention sees only itself, so its anchor operands depend
    on its token id alone (checked for all five backbones, to rounding). But computed by a separate one-token
    forward they differ from the prefill's in the last bits (other matrix shapes, other rounding: up to 5e-5 at
    hidden size 896 in float32), so decoding would no longer reproduce the uncached model exactly; the
    assumption fails for `phantom_anchor_token_id` and explicit position ids; and rows with different first
    tokens would still need a per-row index. The buffers cost 4 x (B, H_q + 2 H_kv, head_dim) per layer and one
    small read per step.
    """

    def __init__(self, config: Any, max_cache_len: int, *args: Any, mode: str = "expanded", **kwargs: Any) -> None:
        _check_mode(mode)
        super().__init__(config, max_cache_len, *args, **kwargs)
        self.mode = mode
        self._clear_anchors()

    def _clear_anchors(self) -> None:
        self.anchor_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._anchored: set[int] = set()  # layers whose buffers hold the current sequences' anchors
        self.derived_weights = {}
        self.anchor_tokens = None

    @classmethod
    def from_static_cache(cls, cache: StaticCache, mode: str = "expanded") -> "PhantomStaticCache":
        """An empty `StaticCache` as a `PhantomStaticCache` that takes over its layers (same sizes, same buffers)."""
        _check_mode(mode)
        if isinstance(cache, PhantomStaticCache):
            return cache
        converted = cls.__new__(cls)
        converted.__dict__.update(cache.__dict__)
        converted.mode = mode
        converted._clear_anchors()
        return converted

    def get_anchors(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.anchor_buffers[layer_idx] if layer_idx in self._anchored else None

    def set_anchors(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        buffers = self.anchor_buffers.get(layer_idx)
        if buffers is None or any(
            buffer.shape != new.shape or buffer.dtype != new.dtype or buffer.device != new.device
            for buffer, new in zip(buffers, (key, value))
        ):
            buffers = tuple(torch.empty(new.shape, dtype=new.dtype, device=new.device) for new in (key, value))
            if not is_torchdynamo_compiling():  # as StaticLayer does: a fixed address for compiled steps and CUDA graphs
                for buffer in buffers:
                    torch._dynamo.mark_static_address(buffer)
            self.anchor_buffers[layer_idx] = buffers
        buffers[0].copy_(key)
        buffers[1].copy_(value)
        self._anchored.add(layer_idx)

    def has_anchors(self) -> bool:
        return bool(self._anchored)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for layer_idx in self._anchored:
            for buffer in self.anchor_buffers[layer_idx]:
                buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))

    def _forget_anchors(self) -> None:
        """Forget the rows' anchors (the buffers stay for the next sequences) and what was kept with them."""
        self._anchored.clear()
        self.derived_weights.clear()
        self.anchor_tokens = None

    def crop(self, *args: Any, **kwargs: Any) -> None:
        super().crop(*args, **kwargs)
        if int(self.get_seq_length()) == 0:
            self._forget_anchors()

    def reset(self) -> None:
        super().reset()
        self._forget_anchors()


__all__ = ["BufferedDynamicLayer", "PhantomCache", "PhantomCacheMixin", "PhantomStaticCache", "static_capacity"]
