"""The Phantom-Dimension cache (PHANTOM_SPEC section 3).

Hub remote code: imports only torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


class PhantomCache(DynamicCache):
    """A `DynamicCache` that also keeps, per layer, the anchor features of each row.

    In `"expanded"` mode (the default) the key/value tensors it stores are the Phantom-expanded ones,
    [k, k*] and [v, v*], of head size 2*head_dim: a decode step computes the expansions of its new
    tokens only, so Phantom Dimension costs O(1) extra work per step. The price is a key/value cache
    twice the size of the backbone's. In `"compact"` mode it stores the plain k and v (the backbone's
    size) and the attention recomputes the expansions of all cached tokens every step (O(N) extra).

    The anchors of a layer are a dict of tensors with the batch in dimension 0: the raw anchor
    features (`q`, `k`, `v`, shapes (B, H_q, D), (B, H_kv, D), (B, H_kv, D)) and the anchor-side
    products of the three cross-attentions, computed once at prefill. Every batch operation of the
    cache (beam reorder, repeat-interleave, select, reset, crop to empty) moves them with the rows.
    """

    def __init__(self, *args: Any, mode: str = "expanded", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if mode not in ("expanded", "compact"):
            raise ValueError(f"PhantomCache mode must be 'expanded' or 'compact', got {mode!r}")
        self.mode = mode
        self.anchors: dict[int, dict[str, torch.Tensor]] = {}

    def get_anchors(self, layer_idx: int) -> dict[str, torch.Tensor] | None:
        """The anchors stored for `layer_idx` at prefill, or None before prefill."""
        return self.anchors.get(layer_idx)

    def set_anchors(self, layer_idx: int, anchors: dict[str, torch.Tensor]) -> None:
        self.anchors[layer_idx] = anchors

    def has_anchors(self) -> bool:
        return bool(self.anchors)

    def _map_anchors(self, fn) -> None:
        self.anchors = {
            layer_idx: {name: fn(tensor) for name, tensor in layer.items()} for layer_idx, layer in self.anchors.items()
        }

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_anchors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_anchors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_anchors(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, *args: Any, **kwargs: Any) -> None:
        super().crop(*args, **kwargs)
        if self.get_seq_length() == 0:
            self.anchors.clear()

    def reset(self) -> None:
        super().reset()
        self.anchors.clear()


__all__ = ["PhantomCache"]
