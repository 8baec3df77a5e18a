"""benchmarks/fused_forms.py, the GPU candidate that gpu_check measures: under torch.compile its decode steps give
the logits of the model's own compiled decode steps, in one graph, and eager calls are the model's own methods."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch._dynamo.testing import CompileCounterWithBackend

from phantom_hf import PhantomStaticCache
from phantom_hf.modeling.compat_phantom import cache_kwargs

from .conftest import left_padded_batch, make_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fused_forms import use_fused_forms  # noqa: E402


def decode_logits(model, compiled) -> torch.Tensor:
    """Prefill 6 tokens eagerly into a static cache, then decode the rest of a left-padded batch with `compiled`."""
    input_ids, attention_mask = left_padded_batch([10, 6], seed=32)
    max_len = input_ids.shape[1] + 2
    cache = PhantomStaticCache(model.config.text_config, max_cache_len=max_len)
    mask = torch.zeros(input_ids.shape[0], max_len, dtype=torch.long)
    mask[:, :6] = attention_mask[:, :6]
    with torch.no_grad():
        logits = [model(input_ids=input_ids[:, :6], attention_mask=mask[:, :6], **cache_kwargs(cache)).logits]
        for position in range(6, input_ids.shape[1]):
            mask[:, position] = attention_mask[:, position]
            logits.append(compiled(input_ids=input_ids[:, position : position + 1], attention_mask=mask, **cache_kwargs(cache)).logits)
    return torch.cat(logits, dim=1)[attention_mask.bool()]


def test_fused_forms_compile_to_one_graph_with_the_models_own_logits() -> None:
    model, fused = make_model(seed=6), make_model(seed=6)
    use_fused_forms(fused)
    expected = decode_logits(model, torch.compile(model.forward, fullgraph=True, backend="aot_eager"))
    counter = CompileCounterWithBackend("aot_eager")
    got = decode_logits(fused, torch.compile(fused.forward, fullgraph=True, backend=counter))
    assert counter.frame_count == 1
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    input_ids, attention_mask = left_padded_batch([7, 5], seed=4)
    with torch.no_grad():  # eager: the model's own methods
        torch.testing.assert_close(fused(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   model(input_ids=input_ids, attention_mask=attention_mask).logits, rtol=0, atol=0)
