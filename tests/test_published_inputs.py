"""A converted published checkpoint, asked through `pipeline("image-text-to-text")`, is fed exactly what the
published Phantom inference code feeds the published model: the same token ids (prompt text, no BOS, the
template's first token as the anchor), the same image layout, hence the same logits.

The published rules, restated here from github ByungKwanLee/Phantom (none of its code is used):
- utils/utils.py `make_instruction` (its demo path) and each model's `prompt_rule` (modeling_phantom.py, split ""):
  user_start + "<image>" + question + user_end + assistant_start;
- modeling_phantom.py `eval_process`: "<image>" -> "<img><IMG_CONTEXT></img>", `<IMG_CONTEXT>` repeated 256 x tiles
  (`add_bundle_tokens`), tokenized with `add_special_tokens=False`, the first token as the Phantom position;
- test.py: several images of one question pasted side by side (utils/utils.py `concat_images_horizontally_with_margin`).
Tokenizers are byte-level BPE trained here (newlines are tokens), with and without a BOS-adding post-processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast, pipeline

from phantom_hf.convert import convert_checkpoint

from .test_convert import HIDDEN, IMAGE, TOKENS_PER_TILE, published_config, published_state, reference_logits, write_published
from .test_processor import published_side_by_side, random_image, published_tiles

RULES = {  # (user_start, user_end, assistant_start) of the published prompt_rule per format
    "chatml": ("<|im_start|>user\n", "<|im_end|>", "<|im_start|>assistant\n"),
    "phi3": ("<|user|>\n", "<|end|>", "<|assistant|>\n"),
}
SPECIAL = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|end|>", "<|assistant|>", "<|system|>", "<img>", "</img>", "<IMG_CONTEXT>"]  # fmt: skip
QUESTION = "Describe the image in detail"
# (published architecture, chat format, whether the tokenizer adds a BOS token): Qwen2's adds none, InternLM2's
# and Phi-3's add <s>.
CASES = [("qwen2", "chatml", False), ("internlm2", "chatml", True), ("phi3", "phi3", True)]


def byte_level_tokenizer(bos: bool, eos: str) -> PreTrainedTokenizerFast:
    corpus = [f"{QUESTION} of the cat and the dog, in red and blue? yes no {i}\n" for i in range(50)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>" if bos else None, eos_token=eos, pad_token="<|endoftext|>", padding_side="left"
    )


def published_input_ids(tokenizer: PreTrainedTokenizerFast, chat_format: str, question: str, tiles: int) -> list[int]:
    user_start, user_end, assistant_start = RULES[chat_format]
    prompt = user_start + "<image>" + question + user_end + assistant_start
    prompt = prompt.replace("<image>", "<img><IMG_CONTEXT></img>")
    prompt = prompt.replace("<IMG_CONTEXT>", "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles))
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def converted(root: Path, arch: str, chat_format: str, bos: bool) -> tuple[Path, dict[str, torch.Tensor], PreTrainedTokenizerFast]:
    """A published checkpoint of `arch` with the tokenizer, converted; returns the folder, the published weights
    and the published tokenizer."""
    tokenizer = byte_level_tokenizer(bos, RULES[chat_format][1])
    vocab = len(tokenizer)
    state = published_state(arch)
    g = torch.Generator().manual_seed(5)
    embedding = "language_model.model." + ("tok_embeddings" if arch == "internlm2" else "embed_tokens") + ".weight"
    head = "language_model." + ("output" if arch == "internlm2" else "lm_head") + ".weight"
    state[embedding], state[head] = torch.randn(vocab, HIDDEN, generator=g), torch.randn(vocab, HIDDEN, generator=g) * 0.2
    src = write_published(root / "published", arch, state, "safetensors")
    config = published_config(arch)
    config["llm_config"]["vocab_size"] = vocab
    config["image_token_index"] = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    (src / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(src)
    convert_checkpoint(src, root / "converted")
    return root / "converted", state, tokenizer


def recorded_pipeline(folder: Path) -> tuple[object, list[dict[str, torch.Tensor]], torch.nn.Module]:
    """The pipeline of the converted folder, and the list into which every `generate` call's inputs go."""
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, phantom_eta=1.0, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    seen: list[dict[str, torch.Tensor]] = []
    generate = model.generate

    def recording(*args, **kwargs):
        seen.append({key: value for key, value in kwargs.items() if isinstance(value, torch.Tensor)})
        return generate(*args, **kwargs)

    model.generate = recording
    return pipeline("image-text-to-text", model=model, processor=processor), seen, model


@pytest.mark.parametrize("arch, chat_format, bos", CASES)
def test_pipeline_feeds_the_published_ids_anchor_and_logits(tmp_path: Path, arch: str, chat_format: str, bos: bool) -> None:
    folder, state, tokenizer = converted(tmp_path, arch, chat_format, bos)
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert (processor_config["add_special_tokens"], processor_config["multi_image_layout"]) == (False, "side_by_side")
    pipe, seen, model = recorded_pipeline(folder)
    image = random_image(40, 30, seed=4)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    pipe(text=chat, max_new_tokens=2)

    expected = published_input_ids(tokenizer, chat_format, QUESTION, published_tiles(40, 30, IMAGE))
    fed = seen[0]["input_ids"][0].tolist()
    assert fed == expected
    assert fed[0] == tokenizer.convert_tokens_to_ids({"chatml": "<|im_start|>", "phi3": "<|user|>"}[chat_format])  # the anchor
    if bos:  # the tokenizer alone would have put <s> in front, and <s> would have been the anchor
        assert tokenizer(tokenizer.decode(fed))["input_ids"][0] == tokenizer.convert_tokens_to_ids("<s>")
    with torch.no_grad():
        logits = model(input_ids=seen[0]["input_ids"], pixel_values=seen[0]["pixel_values"]).logits
    state = {name: tensor.float() for name, tensor in state.items()}
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    reference = reference_logits(arch, state, torch.tensor([expected]), seen[0]["pixel_values"], eta=1.0, image_token_id=image_token_id)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_several_images_are_pasted_side_by_side_as_published(tmp_path: Path) -> None:
    folder, _, tokenizer = converted(tmp_path, "qwen2", "chatml", False)
    pipe, seen, _ = recorded_pipeline(folder)
    images = [random_image(40, 30, seed=1), random_image(20, 50, seed=2)]
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": QUESTION}]
    pipe(text=[{"role": "user", "content": content}], max_new_tokens=1)

    pasted = published_side_by_side(images)
    assert pasted.size == (70, 50)
    expected = published_input_ids(tokenizer, "chatml", QUESTION, published_tiles(*pasted.size, IMAGE))
    assert seen[0]["input_ids"][0].tolist() == expected
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    single = processor(images=pasted, text="<image>", return_tensors="pt")
    torch.testing.assert_close(seen[0]["pixel_values"], single["pixel_values"], rtol=0, atol=0)
    # the other layout stays available: each image tiled on its own, one <image> each
    processor.multi_image_layout = "tiles"
    prompt = processor.user_prompt(QUESTION, images=2)
    assert prompt == "<|im_start|>user\n<image><image>" + QUESTION + "<|im_end|><|im_start|>assistant\n"
    assert processor(images=images, text=prompt)["num_patches"] == [published_tiles(*image.size, IMAGE) for image in images]
