"""Convert a published Phantom checkpoint (research-code layout) into a Hub-native folder, then load it.

`phantom_hf.convert.convert_checkpoint(src, dst)` renames every tensor (InternViT `vision_model.*`, projector
`mlp1.*`, `language_model.*`), splits the packed projections (`attn.qkv`, InternLM2 `wqkv`), adds the image
tokens to the tokenizer and writes weights, config (with `auto_map`), remote code, processor, chat template
and model card. The folder then loads with `AutoModelForImageTextToText.from_pretrained(dst,
trust_remote_code=True)`. Nothing is written when a tensor is unmapped, missing or mis-shaped.

Offline, this script first writes a tiny random checkpoint in the published layout to `OUT/published` (a
published config.json with `llm_config` / `vision_config`, `model.safetensors`, a tokenizer), converts it to
`OUT/converted`, reloads it with the Auto classes and prints the largest logit difference against the model
the checkpoint was written from (0: the conversion is exact).

With a real checkpoint (download it first, e.g. `hf download BK-Lee/Phantom-0.5B --local-dir Phantom-0.5B`):

    python examples/convert_checkpoint.py --src Phantom-0.5B --output-dir phantom-0.5b-hf --preset phantom-0.5b
    phantom-hf convert Phantom-0.5B phantom-0.5b-hf --preset phantom-0.5b     # the same from the command line
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from phantom_hf import PhantomForConditionalGeneration  # noqa: E402
from phantom_hf.convert import config_from_published, convert_checkpoint  # noqa: E402
from phantom_hf.synthetic import generate_examples, vocabulary  # noqa: E402
from phantom_hf.tokenization import build_tokenizer  # noqa: E402

# Our tensor names -> the published ones (applied in order): the reverse of the converter's mapping.
TO_PUBLISHED = (
    ("model.vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("model.vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("model.vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
    ("model.vision_tower.encoder.layer.", "vision_model.encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
    ("model.multi_modal_projector.layer_norm.", "mlp1.0."),
    ("model.multi_modal_projector.linear_1.", "mlp1.1."),
    ("model.multi_modal_projector.linear_2.", "mlp1.3."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.weight", "language_model.lm_head.weight"),
)


def write_tiny_published(folder: Path, seed: int = 0) -> PhantomForConditionalGeneration:
    """A tiny random Phantom checkpoint (Qwen2 LLM, InternViT) in the published layout; returns its model."""
    tokenizer = build_tokenizer(vocabulary())
    published = {
        "model_type": "phantom",
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"], "vocab_size": len(tokenizer), "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        "vision_config": {
            "architectures": ["InternVisionModel"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 28, "patch_size": 7, "qkv_bias": True, "norm_type": "layer_norm",
        },
        "downsample_ratio": 0.5,
        "image_token_index": tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
    }  # fmt: skip
    torch.manual_seed(seed)
    model = PhantomForConditionalGeneration(config_from_published(published)).eval()
    state, qkv = {}, {}
    for name, tensor in model.state_dict().items():
        for ours, theirs in TO_PUBLISHED:
            name = name.replace(ours, theirs)
        head, _, tail = name.rpartition(".")  # InternViT keeps q, k, v packed in one `attn.qkv`
        layer, _, projection = head.rpartition(".attention.")
        if layer.startswith("vision_model.") and projection in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault(f"{layer}.attn.qkv.{tail}", []).append(tensor)
        else:
            state[name] = tensor.contiguous()
    state.update({name: torch.cat(parts) for name, parts in qkv.items()})  # state_dict order: q, k, v
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(published, indent=2))
    tokenizer.save_pretrained(folder)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=None, help="published checkpoint folder (default: write a tiny random one)")
    parser.add_argument("--output-dir", default=None, help="folder for published/ and converted/ (default: temp)")
    parser.add_argument("--preset", default=None, help="phantom-0.5b | phantom-1.8b | phantom-3.8b | phantom-7b")
    parser.add_argument("--dtype", default=None, help="cast the weights, e.g. bfloat16 (default: keep)")
    args = parser.parse_args()

    scratch = tempfile.TemporaryDirectory() if args.output_dir is None else None
    out = Path(args.output_dir or scratch.name)
    reference = None
    src = Path(args.src) if args.src else out / "published"
    if args.src is None:
        reference = write_tiny_published(src)
        print(f"wrote a tiny published checkpoint to {src}: {', '.join(sorted(p.name for p in src.iterdir()))}")

    dst = out / "converted"
    config = convert_checkpoint(src, dst, preset=args.preset, dtype=args.dtype)
    print(f"converted to {dst}: {', '.join(sorted(p.name for p in dst.iterdir()))}")
    print(f"config: {config.text_config.model_type} LLM, {config.vision_config.model_type} vision tower")

    model = AutoModelForImageTextToText.from_pretrained(dst, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
    print(f"loaded with the Auto classes: {type(model).__name__} + {type(processor).__name__}")

    example = generate_examples(1, seed=1, image_size=processor.tile_size)[0]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[prompt], images=[[example.image]], return_tensors="pt")
    inputs = {key: value for key, value in inputs.items() if key != "num_patches"}
    with torch.no_grad():
        logits = model(**inputs).logits
        if reference is not None:
            expected = reference(**inputs).logits
            print(f"max-abs-diff original vs converted: {(logits - expected).abs().max().item():.3e}")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
