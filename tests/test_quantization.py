"""Quantized Phantom: bitsandbytes 8-bit / nf4 and torchao weight-only int8 / int4 on the CPU.

The backbone's linear layers are quantized, the Phantom modules, the vision tower, the projector and `lm_head`
stay plain `nn.Linear`s in the compute dtype (`PhantomPreTrainedModel._modules_not_quantized`). Checked: which
modules each backend quantized, the kept modules' outputs bit-identical to the float model's on the same
inputs, the logits within a stated tolerance of the float model's, cached generation equal to uncached
recomputation, the pipeline, a save/reload round trip, and a QLoRA step in training stage 2.

The backends come with the `quantization` extra (`pip install -e ".[quantization]"`); without it, or where a
backend does not run on this machine, the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BitsAndBytesConfig, pipeline

from phantom_hf import PhantomForConditionalGeneration, PhantomModel

from .conftest import IMAGE_TOKEN_ID, make_model
from .test_pipeline import GREEDY, chat_with, generate_reference, make_model_and_processor
from .test_processor import random_image

# Tolerances of the quantized logits against the float model's on the tiny model (eta = 1, large random Phantom
# weights): the relative error ||q - f|| / ||f|| over all logits of a batch. Measured (bitsandbytes 0.50.2,
# torchao 0.18.0, transformers 5.11 and 5.24 alike): bitsandbytes int8 0.013, torchao int8 0.0087, bitsandbytes nf4
# 0.125, torchao int4 0.127.
TOLERANCE = {8: 0.03, 4: 0.2}

PHANTOM_MODULE = re.compile(r"\.(xattn_(query|key|value)_phantom|gating_phantom_[12])(\.|$)")
KEPT = re.compile(r"^(model\.vision_tower|model\.multi_modal_projector|lm_head)(\.|$)|" + PHANTOM_MODULE.pattern)


@functools.cache
def bitsandbytes_problem() -> str | None:
    """None when bitsandbytes quantizes and runs a linear layer on this CPU in 8 and 4 bits, else why not."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        return f"bitsandbytes is not installed (the `quantization` extra): {error}"
    try:
        layer = nn.Linear(64, 64)
        x = torch.randn(2, 64)
        for quantized in (
            bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False),
            bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4"),
        ):
            quantized.load_state_dict(layer.state_dict())
            quantized = quantized.to("cpu")
            if not torch.allclose(quantized(x), layer(x), atol=0.2):
                return f"bitsandbytes {bnb.__version__} {type(quantized).__name__} computes wrong values on the CPU"
    except Exception as error:  # the backend's own failure, reported as the skip reason
        return f"bitsandbytes {bnb.__version__} does not run on this CPU: {type(error).__name__}: {error}"
    return None


def torchao_problem() -> str | None:
    try:
        import torchao  # noqa: F401
    except ImportError as error:
        return f"torchao is not installed (the `quantization` extra): {error}"
    return None


needs_bitsandbytes = pytest.mark.skipif(bitsandbytes_problem() is not None, reason=str(bitsandbytes_problem()))
needs_torchao = pytest.mark.skipif(torchao_problem() is not None, reason=str(torchao_problem()))


def torchao_config(bits: int):
    """torchao weight-only int8, or int4 in groups of 32: of torchao's int4 forms only `IntxWeightOnlyConfig` runs
    on the CPU (`Int4WeightOnlyConfig`'s packed layouts need CUDA, XPU or the mslk kernels); it keeps the int4
    values unpacked, one per byte."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig

    if bits == 8:
        return TorchAoConfig(Int8WeightOnlyConfig())
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))


def bitsandbytes_config(bits: int, dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig:
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


BACKENDS = [
    pytest.param("bitsandbytes", 8, marks=needs_bitsandbytes, id="bnb-int8"),
    pytest.param("bitsandbytes", 4, marks=needs_bitsandbytes, id="bnb-nf4"),
    pytest.param("torchao", 8, marks=needs_torchao, id="torchao-int8"),
    pytest.param("torchao", 4, marks=needs_torchao, id="torchao-int4"),
]


def quantization_config(backend: str, bits: int, dtype: torch.dtype = torch.float32):
    return bitsandbytes_config(bits, dtype) if backend == "bitsandbytes" else torchao_config(bits)


def is_quantized(parameter: torch.Tensor) -> bool:
    """A weight a backend replaced: a tensor subclass (torchao), or integer storage (bitsandbytes)."""
    return type(parameter.data) is not torch.Tensor or not parameter.dtype.is_floating_point


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    model = make_model(dtype=torch.float32)
    folder = tmp_path_factory.mktemp("float")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def float_model(float_folder):
    return PhantomForConditionalGeneration.from_pretrained(float_folder).eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows with one image (4 placeholders) each, the second left-padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, 128, (2, 12), generator=generator)
    input_ids[:, 2:6] = IMAGE_TOKEN_ID
    input_ids[1, :2] = 0
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    pixel_values = torch.randn(2, 3, 28, 28, generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


# --- the default skip list, without any backend -------------------------------------------------------------------


def test_default_skip_list_keeps_exactly_the_phantom_modules_vision_projector_and_head():
    """transformers' own matcher, fed the class's default list, converts every backbone linear and nothing else."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = PhantomForConditionalGeneration.phantom_quantization_config(BitsAndBytesConfig(load_in_8bit=True))
    skip = config.llm_int8_skip_modules
    for model in (make_model(), PhantomModel(make_model().config)):
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        converted = {name for name in linears if should_convert_module(name, skip)}
        # torchao matches parameter names
        assert converted == {name for name in linears if should_convert_module(f"{name}.weight", skip)}
        prefix = "" if isinstance(model, PhantomForConditionalGeneration) else "model."
        expected = {name for name in linears if not KEPT.search(prefix + name)}
        assert converted == expected
        assert len(expected) == 2 * 7  # q, k, v, o, gate, up, down per layer
        assert sum(bool(PHANTOM_MODULE.search(name)) for name in linears) == 2 * 14


def test_a_config_that_names_its_own_list_keeps_it_plus_the_phantom_modules():
    completed = PhantomForConditionalGeneration.phantom_quantization_config
    mine = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["lm_head"])
    assert completed(mine).llm_int8_skip_modules == ["lm_head", *PhantomForConditionalGeneration._phantom_modules_not_quantized]
    assert mine.llm_int8_skip_modules == ["lm_head"]  # the caller's config is not changed
    as_dict = completed(BitsAndBytesConfig(load_in_8bit=True).to_dict())
    assert as_dict.llm_int8_skip_modules == list(PhantomForConditionalGeneration._modules_not_quantized)
    # torchao's and most other backends' configs name the list `modules_to_not_convert`
    other = SimpleNamespace(modules_to_not_convert=None)
    assert completed(other).modules_to_not_convert == list(PhantomForConditionalGeneration._modules_not_quantized)
    assert other.modules_to_not_convert is None
    no_list = SimpleNamespace(bits=4)
    assert completed(no_list) is no_list


# --- loading, accuracy, generation ----------------------------------------------------------------------------


@functools.cache
def quantized_model(folder: str, backend: str, bits: int) -> PhantomForConditionalGeneration:
    config = quantization_config(backend, bits)
    return PhantomForConditionalGeneration.from_pretrained(folder, quantization_config=config).eval()


@pytest.mark.parametrize("backend, bits", BACKENDS)
def test_backbone_linears_are_quantized_and_phantom_vision_projector_head_kept(float_folder, backend, bits):
    model = quantized_model(str(float_folder), backend, bits)
    weights = {name.removesuffix(".weight"): p for name, p in model.named_parameters() if name.endswith(".weight")}
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    quantized = {name for name in linears if is_quantized(weights[name])}
    assert quantized == {name for name in linears if ".language_model.layers." in name and not PHANTOM_MODULE.search(name)}
    for name, module in model.named_modules():
        if KEPT.search(name) and isinstance(module, nn.Linear):
            # the fused MHCA of Phantom attention reads `linear_q.weight` as a plain tensor: it must stay one
            assert type(module) is nn.Linear and type(module.weight.data) is torch.Tensor, name
            assert module.weight.dtype == torch.float32, name


@pytest.mark.parametrize("backend, bits", BACKENDS)
def test_kept_modules_give_bit_identical_outputs_and_logits_stay_within_tolerance(float_folder, float_model, backend, bits):
    model = quantized_model(str(float_folder), backend, bits)
    generator = torch.Generator().manual_seed(1)
    floats = dict(float_model.named_modules())
    compared = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if PHANTOM_MODULE.search(name) and isinstance(module, nn.Linear):
                x = torch.randn(3, 5, module.in_features, generator=generator)
                assert torch.equal(module(x), floats[name](x)), name
                assert torch.equal(F.linear(x, module.weight), F.linear(x, floats[name].weight)), name  # the raw read
                compared += 1
        assert compared == 2 * 14
        inputs = batch()
        assert torch.equal(model.get_image_features(inputs["pixel_values"]), float_model.get_image_features(inputs["pixel_values"]))
        hidden = torch.randn(2, 7, model.config.text_config.hidden_size, generator=generator)
        assert torch.equal(model.lm_head(hidden), float_model.lm_head(hidden))

        expected = float_model(**inputs).logits
        logits = model(**inputs).logits
    error = float((logits - expected).norm() / expected.norm())
    print(f"{backend} int{bits}: relative logit error {error:.4f}")
    assert error <= TOLERANCE[bits]
    assert error > 0  # the backbone really is quantized


@pytest.mark.parametrize("backend, bits", BACKENDS)
def test_cached_generation_equals_uncached_recomputation(float_folder, backend, bits):
    """Greedy `generate` (PhantomCache, one token per step) picks what a full forward over the text so far picks."""
    model = quantized_model(str(float_folder), backend, bits)
    inputs = batch(seed=2)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID],
            output_scores=True, return_dict_in_generate=True,
        )
        prompt = inputs["input_ids"].shape[1]
        for step, scores in enumerate(out.scores):
            ids = out.sequences[:, : prompt + step]
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, step, dtype=torch.long)], dim=1)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
            logits[:, IMAGE_TOKEN_ID] = float("-inf")
            torch.testing.assert_close(scores, logits, rtol=0, atol=2e-3)
            assert torch.equal(out.sequences[:, prompt + step], logits.argmax(-1))


@pytest.mark.parametrize("backend, bits", BACKENDS)
def test_pipeline_on_a_quantized_folder_equals_generate(tmp_path, backend, bits):
    model, processor = make_model_and_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = quantization_config(backend, bits)
    pipe = pipeline("image-text-to-text", model=str(tmp_path), model_kwargs={"quantization_config": config})
    assert any(is_quantized(p) for p in pipe.model.parameters())
    reference = PhantomForConditionalGeneration.from_pretrained(tmp_path, quantization_config=config).eval()
    chat = chat_with({"type": "image", "image": random_image(80, 60, seed=3)})
    expected_ids, _ = generate_reference(reference, processor, chat)
    tokens = pipe(text=chat, return_tensors=True, generate_kwargs=GREEDY)[0]["generated_token_ids"]
    assert tokens.tolist() == expected_ids.tolist()


@needs_bitsandbytes
def test_bf16_compute_dtype_keeps_the_phantom_modules_in_bf16(float_folder, float_model):
    model = PhantomForConditionalGeneration.from_pretrained(
        float_folder, dtype=torch.bfloat16, quantization_config=bitsandbytes_config(4, torch.bfloat16)
    ).eval()
    dtypes = {p.dtype for name, p in model.named_parameters() if KEPT.search(name)}
    assert dtypes == {torch.bfloat16}
    floats = dict(float_model.named_parameters())
    for name, parameter in model.named_parameters():
        if KEPT.search(name):
            assert torch.equal(parameter, floats[name].to(torch.bfloat16)), name
    with torch.no_grad():
        inputs = batch()
        error = (model(**inputs).logits.float() - float_model(**inputs).logits).norm() / float_model(**inputs).logits.norm()
    assert error <= TOLERANCE[4]


@pytest.mark.parametrize("backend, bits", BACKENDS)
def test_a_saved_quantized_model_reloads_with_the_same_logits(tmp_path, float_folder, backend, bits):
    model = quantized_model(str(float_folder), backend, bits)
    model.save_pretrained(tmp_path)
    reloaded = PhantomForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.quantization_config is not None
    assert {n for n, p in reloaded.named_parameters() if is_quantized(p)} == {n for n, p in model.named_parameters() if is_quantized(p)}
    inputs = batch(seed=4)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


REMOTE_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True, quantization_config=config)
kept = [name for name, p in model.named_parameters() if p.dtype == torch.float32 and type(p.data) is torch.Tensor]
print(json.dumps({"module": type(model).__module__, "kept": kept}))
"""


@needs_bitsandbytes
def test_remote_code_alone_keeps_the_same_modules(float_folder, float_model):
    """What a Hub user gets without phantom_hf installed: the folder's own code declares the modules to keep."""
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(float_folder)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["module"].startswith("transformers_modules")
    linears = {name for name, module in float_model.named_modules() if isinstance(module, nn.Linear)}
    kept_linears = {name.removesuffix(".weight") for name in output["kept"]} & linears
    assert kept_linears == {name for name in linears if KEPT.search(name)}


# --- QLoRA ------------------------------------------------------------------------------------------------------


@needs_bitsandbytes
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_a_stage_two_step_on_a_quantized_model(tmp_path, bits):
    from .test_trainer import IMAGE_TOKEN_ID as TRAINER_IMAGE_TOKEN_ID
    from .test_trainer import color_triples, make_args, make_processor
    from .test_trainer import make_model as make_trainer_model
    from phantom_hf.trainer import PhantomPOTrainer, phantom_lora_config

    make_trainer_model().save_pretrained(tmp_path / "float")
    model = PhantomForConditionalGeneration.from_pretrained(tmp_path / "float", quantization_config=bitsandbytes_config(bits))
    assert model.config.image_token_id == TRAINER_IMAGE_TOKEN_ID
    quantized_before = {n: p.detach().clone() for n, p in model.named_parameters() if is_quantized(p)}
    assert quantized_before
    args = make_args(tmp_path, training_stage=2, max_steps=1)
    trainer = PhantomPOTrainer(
        model, args, train_dataset=color_triples(4), processing_class=make_processor(), peft_config=phantom_lora_config(r=4)
    )
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("modules_to_save" in n and "phantom" in n for n in trainable)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = dict(trainer.model.named_parameters())
    changed = {n for n, before in trainable.items() if not torch.equal(before, after[n].detach())}
    assert any("lora_B" in n for n in changed) and any("modules_to_save" in n and "phantom" in n for n in changed)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trainer.model.named_parameters()}
    for name, before in quantized_before.items():
        assert torch.equal(base[name].detach(), before), name  # the quantized backbone is frozen


@pytest.mark.parametrize("backend, bits", BACKENDS)
def test_stage_two_freezes_exactly_the_quantized_weights(float_folder, backend, bits):
    from phantom_hf.trainer import apply_training_stage

    model = PhantomForConditionalGeneration.from_pretrained(float_folder, quantization_config=quantization_config(backend, bits))
    trainable = set(apply_training_stage(model, 2))
    expected = {n for n, p in model.named_parameters() if not is_quantized(p) and not n.startswith("model.vision_tower.")}
    assert trainable == expected
    assert any(PHANTOM_MODULE.search(n) for n in trainable) and any("language_model.layers" in n and "norm" in n for n in trainable)
