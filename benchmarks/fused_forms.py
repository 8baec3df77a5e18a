"""Phantom's decode step with the MHCA and the fold written for torch.compile to fuse: a candidate to measure on a GPU.

On an H200, batch-1 decoding is bound by latency, and Phantom's compiled decode step is 31 us per layer longer than
the plain backbone's: about 9 more kernels per layer (4 library products: the stacked Lq, the MHCA's scores and values,
the fold gate's 1-wide product; 5 fused kernels; BENCHMARKS.md, "GPU check"). Written as broadcast products and sums,
the MHCA after its Lq product and the whole fold become one fused kernel each in inductor's code (3 extra kernels per
layer). On the CPU that changed nothing; whether it pays on a GPU is what `decode.py --variants
phantom-compiled,phantom-fused-compiled` measures (gpu_check's compiled decode run includes it).

`use_fused_forms(model)` binds the two methods to every Phantom attention layer of one model (per instance, as
`decode_revisions.py` binds a revision's); outside a compiled decode step they call the model's own methods.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import is_torchdynamo_compiling

from phantom_hf.modeling.modeling_phantom import PhantomAttentionMixin, softmax_in_float32


def fused_expand(self: Any, paths: str, states: tuple[torch.Tensor, ...], anchors: Any, derived: tuple) -> tuple[torch.Tensor, ...]:
    """`PhantomAttentionMixin._phantom_expand` for all three paths of one token, scores and values as sums."""
    if not is_torchdynamo_compiling() or paths != "qkv" or states[0].shape[2] != 1 or self.phantom_expansion != "mhca":
        return PhantomAttentionMixin._phantom_expand(self, paths, states, anchors, derived)
    batch, dim = states[0].shape[0], states[0].shape[-1]
    sizes = [x.shape[1] for x in states]
    key, value = anchors
    stacked = torch.cat(states, dim=1)
    hidden = F.gelu(F.linear(stacked, derived[0]).reshape(batch, -1, 1, 3 * dim))
    scores = (hidden * key[:, None]).sum(-1) * dim**-0.5 + self._phantom_mask(key.dtype, key.device)
    expansion = (softmax_in_float32(scores)[..., None] * value[:, None]).sum(-2)
    expansion = F.gelu(expansion).mul(self.phantom_config.phantom_eta).view(batch, -1, 1, dim)
    residual = torch.zeros_like(stacked)
    residual[:, -sizes[-1] :] = stacked[:, -sizes[-1] :]  # v* = v + eta * MHCA(v, a)
    return torch.cat([stacked, expansion + residual], dim=-1).split(sizes, dim=1)


def fused_fold(self: Any, output: torch.Tensor, derived: tuple) -> torch.Tensor:
    """`PhantomAttentionMixin._phantom_fold` with the gate's 1-wide product as a sum."""
    if not is_torchdynamo_compiling() or self.phantom_mixing != "weighted":
        return PhantomAttentionMixin._phantom_fold(self, output, derived)
    _, gate_weight, gate_bias = derived
    first, second = output[..., : self.head_dim], output[..., self.head_dim :]
    return torch.lerp(second, first, torch.sigmoid((output * gate_weight[0]).sum(-1, keepdim=True) + gate_bias))


def use_fused_forms(model: Any) -> None:
    """Bind `fused_expand` and `fused_fold` to every Phantom attention layer of `model`."""
    for layer in model.language_model.layers:
        attention = layer.self_attn
        attention._phantom_expand = types.MethodType(fused_expand, attention)
        attention._phantom_fold = types.MethodType(fused_fold, attention)
