"""Inference with a Phantom model: `pipeline("image-text-to-text")`, `model.generate`, and the Auto classes.

Builds a tiny random Phantom model and its processor (or loads yours with `--model FOLDER`), saves them as a
Hub-style folder (weights, config with `auto_map`, remote code, processor, chat template, model card), then
answers one question about a PIL image three ways and prints each answer:

1. `pipeline("image-text-to-text", model=folder, trust_remote_code=True)` on a chat message holding the image;
2. `processor.apply_chat_template(...)` + `model.generate` + `processor.batch_decode`;
3. `AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` + `generate`.

All three decode greedily, so they print the same answer. The tiny model's weights are random: its answer is
a few arbitrary words. For a real model, pass a converted folder (`phantom-hf convert`, see
examples/convert_checkpoint.py) or a Hub id once you are online:

    python examples/inference_pipeline.py --model path/to/phantom-0.5b --image photo.jpg --question "What is this?"
    HF_HUB_OFFLINE=0 python examples/inference_pipeline.py --model <namespace>/<phantom-repo> --image photo.jpg
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline  # noqa: E402

from phantom_hf import PhantomForConditionalGeneration, PhantomProcessor  # noqa: E402
from phantom_hf.hub import save_model_folder  # noqa: E402
from phantom_hf.synthetic import generate_examples, vocabulary  # noqa: E402
from phantom_hf.tiny import tiny_phantom_config  # noqa: E402
from phantom_hf.tokenization import build_tokenizer  # noqa: E402


def build_tiny(seed: int = 0) -> tuple[PhantomForConditionalGeneration, PhantomProcessor]:
    """A tiny random Phantom model (Qwen2 decoder, InternViT on 28 px tiles) and its processor, built offline."""
    tokenizer = build_tokenizer(vocabulary())
    config = tiny_phantom_config(
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        # larger random weights than the default 0.02, so the answer is varied words, not one repeated token
        text_config={"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "initializer_range": 0.2},
        phantom_eta=1.0,  # let the (random) Phantom path weigh in, as in a trained model
    )
    torch.manual_seed(seed)
    model = PhantomForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, PhantomProcessor.from_config(config, tokenizer, max_patches=2)


def generate_answer(model, processor, chat: list[dict], max_new_tokens: int) -> str:
    """Greedy answer to `chat` with `model.generate`, decoded without the prompt."""
    inputs = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(output, prompt_ids=inputs["input_ids"])[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved Phantom folder (or Hub id); default: a tiny random one")
    parser.add_argument("--output-dir", default=None, help="where the tiny model is saved (default: a temp folder)")
    parser.add_argument("--image", default=None, help="an image file (default: a synthetic picture of shapes)")
    parser.add_argument("--question", default=None, help="default: a question about the synthetic picture")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    args = parser.parse_args()

    scratch = tempfile.TemporaryDirectory() if args.model is None and args.output_dir is None else None
    if args.model is None:
        folder = Path(args.output_dir or scratch.name)
        model, processor = build_tiny()
        save_model_folder(folder, model, processor, card={})  # weights, config, remote code, processor, model card
        print(f"saved a tiny Phantom model to {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
        folder = str(folder)
    else:
        folder = args.model

    if args.image:
        image = Image.open(args.image).convert("RGB")
        question = args.question or "What is in this image?"
        print(f"image: {args.image} ({image.width}x{image.height})")
    else:
        example = generate_examples(1, seed=3, image_size=56)[0]
        image, question = example.image, args.question or example.question
        print(f"image: {example.description}")
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    print(f"question: {question}")

    # 1. The pipeline, straight from the folder (the Hub way: remote code next to the weights).
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    greedy = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    result = pipe(text=chat, generate_kwargs=greedy, return_full_text=False)
    print(f"pipeline model: {type(pipe.model).__module__}.{type(pipe.model).__name__}")
    print(f"pipeline answer: {result[0]['generated_text'].strip()!r}")

    # 2. The same model and processor by hand: chat template -> generate -> batch_decode.
    print(f"generate answer: {generate_answer(pipe.model, pipe.processor, chat, args.max_new_tokens)!r}")

    # 3. The Auto classes, as any transformers user loads a Hub checkpoint.
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    print(f"auto classes: {type(model).__name__} + {type(processor).__name__}")
    print(f"auto answer: {generate_answer(model, processor, chat, args.max_new_tokens)!r}")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
