"""The Xmodel-VLM baseline and its "+Phantom Dimension" twin (paper Table 5) on the synthetic shapes task.

Both models are the LLaVA-1.5 / Xmodel-VLM design at toy size: a CLIP vision tower (features of its second-to-last
layer, CLS dropped), the XDP projector (4 vision tokens -> 1, Linear-Mish-Linear) and a Llama decoder, with the
Vicuna v1 conversation format. The twin is the same model, same initial weights, with Phantom Dimension added to
every attention layer (a no-op at initialisation, eta = 1e-4). Both train with the same budget and recipe —
step 1: language model frozen, projector (+ Phantom modules) trained; step 2: everything trained, plain SFT — and
the script prints both held-out exact-match accuracies (greedy answers on unseen scenes).

    python examples/xmodel_baseline.py                      # a few minutes on 2 CPU cores
    python examples/xmodel_baseline.py --steps 40 80 --po   # PO (Eq. 4) in step 1 for both

Everything is built offline; nothing is downloaded. Toy-scale numbers show the pipeline, not the paper's effect
sizes: at the default budget (about a minute on one CPU thread) both models still answer one colour for every
question (9.4% each on the 32 held-out questions with seed 0); larger budgets are needed to read the images.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers import CLIPVisionConfig  # noqa: E402

from phantom_hf import PhantomConfig, PhantomForConditionalGeneration  # noqa: E402
from phantom_hf.answering import answer_questions  # noqa: E402
from phantom_hf.modeling.configuration_phantom import is_phantom_name  # noqa: E402
from phantom_hf.modeling.processing_phantom import VICUNA_V1_SYSTEM, PhantomProcessor  # noqa: E402
from phantom_hf.recipe import RecipeStep, run_recipe  # noqa: E402
from phantom_hf.synthetic import SyntheticExample, generate_splits, split_words, to_dataset, vocabulary  # noqa: E402
from phantom_hf.tiny import tiny_text_config  # noqa: E402
from phantom_hf.tokenization import DEFAULT_SPECIAL_TOKENS, build_tokenizer  # noqa: E402
from phantom_hf.trainer import PhantomPOConfig  # noqa: E402

IMAGE_SIZE = 28  # 4 x 4 patches of 7 px: 16 CLIP tokens, 4 after XDP


def build_baseline(seed: int = 0) -> tuple[PhantomForConditionalGeneration, PhantomProcessor]:
    """A toy Xmodel-VLM (CLIP + XDP + Llama, `phantom_dimension=False`) and its processor (LLaVA "pad" images,
    Vicuna v1 chat template)."""
    words = vocabulary() + split_words(VICUNA_V1_SYSTEM) + ["USER", "ASSISTANT"]
    tokenizer = build_tokenizer(words, (*DEFAULT_SPECIAL_TOKENS, "</s>"), eos_token="</s>", padding_side="right")
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=7
    )
    config = PhantomConfig(
        vision_config=vision,
        text_config=tiny_text_config("llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        projector_type="xdp",
        vision_feature_layer=-2,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        phantom_dimension=False,
    )
    torch.manual_seed(seed)
    model = PhantomForConditionalGeneration(config)
    return model, PhantomProcessor.from_config(config, tokenizer)


def phantom_twin(baseline: PhantomForConditionalGeneration, seed: int = 0) -> PhantomForConditionalGeneration:
    """The baseline with Phantom Dimension: its weights, plus freshly initialised Phantom modules."""
    config = PhantomConfig.from_dict({**baseline.config.to_dict(), "phantom_dimension": True})
    torch.manual_seed(seed)
    twin = PhantomForConditionalGeneration(config)
    missing, unexpected = twin.load_state_dict(baseline.state_dict(), strict=False)
    if unexpected or not missing or not all(is_phantom_name(name) for name in missing):
        raise RuntimeError(f"the twin should differ by Phantom modules only; missing {missing}, unexpected {unexpected}")
    return twin


def train(
    model: PhantomForConditionalGeneration, processor: PhantomProcessor, dataset: Any, steps: tuple[int, int], output_dir: Path,
    learning_rate: float, batch_size: int, po: bool, seed: int,
) -> dict[int, list[str]]:
    """Step 1 (LLM frozen) then step 2 (everything, SFT); returns the trainable parameter names of each step."""
    recipe = [
        RecipeStep(
            PhantomPOConfig(
                output_dir=str(output_dir / f"stage{stage}"),
                training_stage=stage,
                po_weight=1.0 if po and stage == 1 else 0.0,
                max_steps=max_steps,
                per_device_train_batch_size=batch_size,
                learning_rate=learning_rate,
                logging_steps=max(1, max_steps // 4),
                save_strategy="no",
                bf16=False,
                use_cpu=not torch.cuda.is_available(),
                report_to=[],
                disable_tqdm=True,
                dataloader_num_workers=0,
                seed=seed,
            )
        )
        for stage, max_steps in zip((1, 2), steps)
    ]
    trained = run_recipe(model, processor, recipe, dataset)
    return {step.step.config.training_stage: step.trainable for step in trained.steps}


def exact_match(model: PhantomForConditionalGeneration, processor: PhantomProcessor, examples: list[SyntheticExample]) -> dict[str, Any]:
    """Greedy answers to held-out questions; accuracy = share of answers equal to the correct one."""
    model.eval()
    questions = [example.question for example in examples]
    answers = answer_questions(model, processor, questions, [example.image for example in examples], batch_size=1, max_new_tokens=6)
    hits = [answer == example.chosen for answer, example in zip(answers, examples)]
    return {"accuracy": sum(hits) / len(hits), "questions": questions, "answers": answers}


def run(
    steps: tuple[int, int] = (60, 120),
    num_images: int = 64,
    num_held_out: int = 32,
    learning_rate: float = 3e-3,
    batch_size: int = 8,
    po: bool = False,
    seed: int = 0,
    output_dir: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the baseline and its twin with the same data, steps and settings; held-out results of both."""
    train_examples, held_out = generate_splits(num_images, num_held_out, seed=seed, image_size=IMAGE_SIZE, kinds=("color",))
    dataset = to_dataset(train_examples)
    baseline, processor = build_baseline(seed)
    twin = phantom_twin(baseline, seed)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(output_dir or scratch)
        for name, model in (("baseline", baseline), ("+Phantom Dimension", twin)):
            trainable = train(model, processor, dataset, steps, root / name.strip("+").replace(" ", "-"), learning_rate, batch_size, po, seed)
            results[name] = {**exact_match(model, processor, held_out), "trainable": trainable}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs=2, default=[60, 120], metavar=("STEP1", "STEP2"), help="optimizer steps per step")
    parser.add_argument("--num-images", type=int, default=64, help="training scenes (one colour question each)")
    parser.add_argument("--num-held-out", type=int, default=32, help="unseen scenes for the exact-match accuracy")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="the paper's 1e-5 is for real models")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--po", action="store_true", help="Phantom Optimization (Eq. 4) in step 1 for both models")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = run(tuple(args.steps), args.num_images, args.num_held_out, args.learning_rate, args.batch_size, args.po, args.seed)
    for name, result in results.items():
        extra = len(result["trainable"][1]) - len(results["baseline"]["trainable"][1])
        print(f"{name:>20}: held-out exact match {result['accuracy']:.1%} on {len(result['questions'])} questions"
              + (f" ({extra} more trainable tensors in step 1)" if extra else ""))


if __name__ == "__main__":
    main()
