"""Make the golden fixture of `tests/test_published_golden.py` with the published Phantom code itself.

Run once, in the published code's own environment, never by the test suite (docs/design.md, section 5):

    python tests/golden/make_published_golden.py --published-repo /path/to/ByungKwanLee/Phantom [--out tests/golden/published]

The published repository (github ByungKwanLee/Phantom) is imported from `--published-repo`; none of its code is
copied here. For each published architecture this script

1. builds the published `PhantomForCausalLM` (its own classes, its own config classes) at a tiny size, takes the
   names and shapes of its state dict and fills them with seeded random values, rounded to bfloat16 (the published
   checkpoints' dtype). The Phantom modules get the published eta (the `XAttention` default, 1e-4) with their
   output projections `linear_o` scaled by 1/eta, so that the Phantom Dimension moves the logits by O(1) (measured:
   the run is repeated with eta = 0 and the difference recorded);
2. writes the published folder `<out>/<arch>/checkpoint/`: `config.json` as the published `PhantomConfig` saves it,
   `model.safetensors` (bfloat16) and a byte-level BPE tokenizer trained here; and `<out>/<arch>/image.png`;
3. runs the published inference (`eval_process` then `generate`, greedy) on a question about the image (the
   published demo's `data="demo"` path), on a text-only question and, for Qwen2, on both in one left-padded batch
   (the anchor of the padded row is its first token, not position 0), and records the prompts' token ids, a
   subsample of the published pixel values, the generated tokens and the logits of every generated step, in
   `<out>/<arch>/expected.safetensors` and `expected.json`.

Where the published inference cannot run unchanged on a CPU in float32, the script adapts the runtime around it and
says so here:
- the model runs in float32 (the published loader uses bfloat16); the published `generate` still rounds the pixel
  values to bfloat16 (`pixel_values.to(torch.bfloat16)`), and a forward pre-hook on the vision tower's patch
  embedding hands those rounded pixels to the float32 convolution;
- Qwen2 (Phantom-0.5B) runs its `sdpa` attention class (it carries the Phantom Dimension; the published loader picks
  `flash_attention_2`, whose Phantom code is the same);
- InternLM2 (1.8B, 7B) and Phi-3 (3.8B) have the Phantom Dimension only in their FlashAttention-2 classes: a stand-in
  `flash_attn` module (`flash_attn_func` computed in plain torch: softmax scale, causal mask aligned bottom-right,
  `window_size`) is put in `sys.modules` before their code is imported. Only unpadded single prompts are run, so the
  variable-length kernels are never called.

The published code needs two transformers releases, so the fixture is made in two runs of one environment:

    python -m venv /tmp/phantom-published && . /tmp/phantom-published/bin/activate
    pip install torch==2.13.0 torchvision==0.28.0 timm einops safetensors  # the PyPI torch: torchvision's wheels need it
    pip install transformers==4.37.2 && python tests/golden/make_published_golden.py --published-repo REPO --arch internlm2 phi3
    pip install transformers==4.42.4 && python tests/golden/make_published_golden.py --published-repo REPO --arch qwen2

The versions of each run (Python 3.11.7, torch 2.13.0, torchvision 0.28.0, tokenizers 0.15.2 / 0.19.1, timm 1.0.31,
einops 0.8.2, safetensors 0.8.0) and the published commit are recorded in each `expected.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.machinery
import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

SEED = 0
QUESTION_IMAGE = "Describe the image in detail"
QUESTION_TEXT = "What color is the sky on a clear day?"
MAX_NEW_TOKENS = 8
IMAGE_SIZE = (64, 32)  # (width, height): a 2:1 image, tiled by the published code as 2 tiles + a thumbnail
PIXEL_STRIDE = 32  # recorded pixel subsample: every 32nd row and column of each tile
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|end|>", "<|assistant|>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>"]  # fmt: skip

# Tiny sizes. The vision side must keep the published tile (448 px, patch 14: 256 tokens per tile after the pixel
# shuffle), which the published inference hard-codes.
VISION = {
    "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 448,
    "patch_size": 14, "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
    "hidden_act": "gelu", "drop_path_rate": 0.0, "use_flash_attn": False, "architectures": ["InternVisionModel"],
}  # fmt: skip
TEXT = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "hidden_act": "silu", "max_position_embeddings": 2048, "tie_word_embeddings": False,
}  # fmt: skip

# Per architecture: the published package, the transformers release its code runs on (the published requirements.txt
# pins 4.37.2 for 1.8B/3.8B/7B; the 0.5B code's cache handling needs 4.42), its backbone config, its end-of-turn token.
ARCHS = {
    "qwen2": {
        "package": "model.arch_0_5b",
        "transformers": "4.42.4",
        "llm": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                "use_sliding_window": False},
        "eos": "<|im_end|>",
    },
    "internlm2": {
        "package": "model.arch_1_8b",
        "transformers": "4.37.2",
        "llm": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "rms_norm_eps": 1e-5,
                "rope_theta": 1e6, "bias": False, "rope_scaling": None, "attn_implementation": "flash_attention_2"},
        "eos": "<|im_end|>",
    },
    "phi3": {
        "package": "model.arch_3_8b",
        "transformers": "4.37.2",
        "llm": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "rms_norm_eps": 1e-5, "rope_theta": 1e4,
                "rope_scaling": None, "original_max_position_embeddings": 2048, "sliding_window": 64,
                "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attention_dropout": 0.0},
        "eos": "<|end|>",
    },
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The runtime around the published code
# ---------------------------------------------------------------------------------------------------


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
    """FlashAttention-2's `flash_attn_func` in plain torch: q (B, Lq, H, D), k/v (B, Lk, Hkv, D); causal mask aligned
    to the bottom-right (flash-attn >= 2.1); key j is visible from query i when i + Lk - Lq - left <= j <=
    i + Lk - Lq + right (a negative bound is unlimited)."""
    if dropout_p:
        raise ValueError("the stand-in flash_attn_func runs inference only (dropout_p=0)")
    lq, lk, heads = q.shape[1], k.shape[1], q.shape[2]
    k = k.repeat_interleave(heads // k.shape[2], dim=2)
    v = v.repeat_interleave(heads // v.shape[2], dim=2)
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    i = torch.arange(lq)[:, None] + (lk - lq)
    j = torch.arange(lk)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    left, right = window_size
    if causal:
        right = 0
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)


def _not_run(*args, **kwargs):
    raise NotImplementedError("the stand-in flash_attn has no variable-length kernels; run unpadded single prompts")


def install_flash_attn_stand_in() -> None:
    """Put the stand-in `flash_attn` (see `flash_attn_func`) in `sys.modules`."""
    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # found, but without a version: "< 2.1"
    package.flash_attn_func = flash_attn_func
    package.flash_attn_varlen_func = _not_run
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.index_first_axis = padding.pad_input = padding.unpad_input = _not_run
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface.flash_attn_varlen_qkvpacked_func = _not_run
    package.bert_padding, package.flash_attn_interface = padding, interface
    sys.modules.update(
        {"flash_attn": package, "flash_attn.bert_padding": padding, "flash_attn.flash_attn_interface": interface}
    )


def train_tokenizer(folder: Path, bos: bool):
    """A byte-level BPE tokenizer (newlines are tokens, as in Qwen2's), the published special tokens added, `<s>` put
    in front by default when `bos` (as InternLM2's and Phi-3's tokenizers do; the published inference turns it off);
    saved in `folder` and returned as `AutoTokenizer` loads it (as the published loader does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    corpus = [
        f"{QUESTION_IMAGE}. {QUESTION_TEXT} The sky is blue, the grass is green, a cat sits on a red mat {i}.\n"
        for i in range(40)
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    if bos:
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>" if bos else None, pad_token="<|endoftext|>", padding_side="left"
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, padding_side="left")


def make_image(path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(SEED)
    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) % 32 * 8], axis=-1)  # smooth ramps, then noise
    array = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(array, mode="RGB").save(path)


def published_config(arch: str, tokenizer, package) -> object:
    """The published `PhantomConfig` of the tiny model (built with the published config classes)."""
    vocab = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids(ARCHS[arch]["eos"])
    llm = {**TEXT, **ARCHS[arch]["llm"], "vocab_size": vocab, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    if arch != "qwen2":
        llm["bos_token_id"] = tokenizer.convert_tokens_to_ids("<s>")
    config_module = importlib.import_module(package + ".configuration_phantom")
    config = config_module.PhantomConfig(
        vision_config=dict(VISION),
        llm_config=llm,
        downsample_ratio=0.5,
        template="phantom",
        image_token_index=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        eos_token_id=eos,
        architectures=["PhantomForCausalLM"],
    )
    if arch == "qwen2":
        config.llm_config._attn_implementation = "sdpa"
    return config


def random_state(model: torch.nn.Module, eta: float) -> dict[str, torch.Tensor]:
    """Seeded random values for every tensor of the published state dict, rounded to bfloat16: norms near 1, biases
    and weights at scales that keep activations O(1); each Phantom `linear_o` scaled by 1/eta."""
    g = torch.Generator().manual_seed(SEED)
    state = {}
    for name, tensor in sorted(model.state_dict().items()):
        shape = tensor.shape
        noise = torch.randn(shape, generator=g)
        parts = name.split(".")
        if parts[-1] in ("ls1", "ls2"):
            value = 0.5 * noise
        elif parts[-1] == "bias":
            value = 0.1 * noise
        elif parts[-1] == "weight" and ("norm" in parts[-2] or name == "vision_proj.0.weight"):
            value = 1 + 0.1 * noise
        elif parts[-2] in ("embed_tokens", "tok_embeddings") or parts[-1] in ("class_embedding", "position_embedding"):
            value = noise
        else:
            value = noise * (1.5 / math.sqrt(int(np.prod(shape[1:]))))
            if name.endswith("linear_o.weight"):
                value = value / eta
        state[name] = value.to(torch.bfloat16).contiguous()
    return state


def phantom_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    names = ("xattn_query_phantom", "xattn_key_phantom", "xattn_value_phantom")
    return [module for name, module in model.named_modules() if name.endswith(names)]


def run_published(model, tokenizer, inputs: list[dict], data: str) -> dict[str, torch.Tensor]:
    """The published inference: `eval_process` then greedy `generate`; tokens and every step's logits."""
    with torch.inference_mode():
        prepared = model.eval_process(inputs=inputs, tokenizer=tokenizer, data=data, device="cpu")
        out = model.generate(
            **prepared, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_scores=True, return_dict_in_generate=True
        )
    result = {
        "input_ids": prepared["input_ids"],
        "attention_mask": prepared["attention_mask"],
        "phantom_position": prepared["phantom_position"],
        "tokens": out.sequences[:, -len(out.scores) :],  # transformers 4.37 puts a BOS token before them
        "step_logits": torch.stack(out.scores, dim=1).float(),
    }
    if "pixel_values" in prepared:
        result["pixel_values"] = prepared["pixel_values"]
    return result


def make_fixture(arch: str, out: Path, commit: str) -> None:
    from PIL import Image
    from safetensors.torch import save_file
    from torchvision.transforms.functional import pil_to_tensor

    package = ARCHS[arch]["package"]
    folder, checkpoint = out / arch, out / arch / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer = train_tokenizer(checkpoint, bos=arch != "qwen2")
    config = published_config(arch, tokenizer, package)
    model_class = importlib.import_module(package + ".modeling_phantom").PhantomForCausalLM
    model = model_class(config).float().eval()
    eta = phantom_modules(model)[0].eta
    state = random_state(model, eta)
    model.load_state_dict({name: value.float() for name, value in state.items()}, strict=True)
    model.vision_model.embeddings.patch_embedding.register_forward_pre_hook(
        lambda module, args: (args[0].to(module.weight.dtype),)
    )

    config.save_pretrained(checkpoint)
    save_file(state, checkpoint / "model.safetensors")
    make_image(folder / "image.png")
    image = pil_to_tensor(Image.open(folder / "image.png").convert("RGB"))
    # (rows, the published `data` name): the demo's path, which puts "<image>" before the question itself; a
    # benchmark name that adds nothing; and, for Qwen2 (whose sdpa class takes padding), both rows in one left-padded
    # batch, where the question carries its "<image>" as the benchmark datasets' do.
    cases = {
        "image": ([{"image": image, "question": QUESTION_IMAGE}], "demo"),
        "text": ([{"question": QUESTION_TEXT}], "llava"),
    }
    if arch == "qwen2":
        rows = [{"image": image, "question": "<image>" + QUESTION_IMAGE}, {"question": QUESTION_TEXT}]
        cases["batch"] = (rows, "llava")
    special = {tokenizer.convert_tokens_to_ids(token) for token in ("<IMG_CONTEXT>", "<img>", "</img>")}
    tensors, cases_meta = {}, {}
    for case, (inputs, data) in cases.items():
        result = run_published(model, tokenizer, inputs, data)
        for module in phantom_modules(model):
            module.eta = 0.0
        without = run_published(model, tokenizer, inputs, data)
        for module in phantom_modules(model):
            module.eta = eta
        generated = result["tokens"].tolist()
        if special & set(sum(generated, [])):
            raise SystemExit(f"{arch}/{case}: the random model generated an image token {generated}; change SEED")
        effect = (result["step_logits"][:, 0] - without["step_logits"][:, 0]).abs().max().item()
        for key in ("input_ids", "attention_mask", "tokens"):
            tensors[f"{case}.{key}"] = result[key].to(torch.int32).contiguous()
        tensors[f"{case}.step_logits"] = result["step_logits"].contiguous()
        if "pixel_values" in result:
            pixels = result["pixel_values"]
            tensors[f"{case}.pixel_values_subsample"] = pixels[:, :, ::PIXEL_STRIDE, ::PIXEL_STRIDE].contiguous()
            tiles = pixels.shape[0]
        else:
            tiles = 0
        attended = [ids[mask.bool()] for ids, mask in zip(result["input_ids"], result["attention_mask"])]
        prompts = tokenizer.batch_decode(attended)
        cases_meta[case] = {
            "questions": [row["question"].removeprefix("<image>") for row in inputs],
            "images": [int("image" in row) for row in inputs],
            "published_data": data,
            "prompts": [re.sub("(<IMG_CONTEXT>)+", "<IMG_CONTEXT>*256*tiles", text) for text in prompts],
            "tiles": tiles,
            "phantom_position": [row.nonzero().flatten().tolist() for row in result["phantom_position"]],
            "generated_text": tokenizer.batch_decode(result["tokens"]),
            "max_abs_logit_change_from_phantom_at_first_step": effect,
        }
        print(f"{arch}/{case}: {result['input_ids'].shape[1]} prompt tokens, {tiles} tiles, tokens {generated}, "
              f"Phantom Dimension moves the first logits by up to {effect:.3f}")  # fmt: skip
    save_file(tensors, folder / "expected.safetensors")
    packages = ("torch", "transformers", "tokenizers", "torchvision", "safetensors")
    versions = {name: importlib.import_module(name).__version__ for name in packages}
    meta = {
        "published_repository": "github.com/ByungKwanLee/Phantom",
        "published_commit": commit,
        "published_package": package,
        "published_eta": eta,
        "attention": "sdpa" if arch == "qwen2" else "flash_attention_2 (stand-in flash_attn_func)",
        "dtype": "float32 compute, bfloat16 weights and bfloat16-rounded pixel values",
        "max_new_tokens": MAX_NEW_TOKENS,
        "pixel_stride": PIXEL_STRIDE,
        "versions": {"python": sys.version.split()[0], **versions},
        "weights_sha256": hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest(),
        "cases": cases_meta,
    }
    (folder / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published-repo", type=Path, required=True, help="a checkout of github ByungKwanLee/Phantom")
    parser.add_argument("--published-commit", default=None, help="its commit, when the checkout is not a git work tree")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "published")
    parser.add_argument("--arch", choices=list(ARCHS), nargs="*", default=list(ARCHS))
    args = parser.parse_args()
    repo = args.published_repo.resolve()
    if not (repo / "model" / "arch_0_5b" / "modeling_phantom.py").is_file():
        raise SystemExit(f"{repo} is not a checkout of ByungKwanLee/Phantom (no model/arch_0_5b/modeling_phantom.py)")
    commit = args.published_commit
    if commit is None:
        found = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = found.stdout.strip() if found.returncode == 0 else "unknown"
    import transformers

    wrong = [arch for arch in args.arch if ARCHS[arch]["transformers"] != transformers.__version__]
    if wrong:
        raise SystemExit(
            f"transformers {transformers.__version__} is installed; "
            + "; ".join(f"{arch} runs on transformers=={ARCHS[arch]['transformers']}" for arch in wrong)
        )
    torch.set_num_threads(1)
    if set(args.arch) - {"qwen2"}:
        install_flash_attn_stand_in()
    sys.path.insert(0, str(repo))
    for arch in args.arch:
        make_fixture(arch, args.out, commit)


if __name__ == "__main__":
    main()
