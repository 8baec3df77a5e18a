"""pipeline("image-text-to-text") on Phantom: from a saved folder (remote code) and from objects, against
`model.generate` on the processor's own output; batched generation with mixed image counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from phantom_hf.modeling import PhantomForConditionalGeneration
from phantom_hf.modeling.processing_phantom import PhantomProcessor

from .conftest import randomize_phantom_weights
from .test_processor import make_tokenizer, random_image, tiny_config

MAX_NEW_TOKENS = 5
GREEDY = {"do_sample": False, "max_new_tokens": MAX_NEW_TOKENS}


def make_model_and_processor(dtype: torch.dtype = torch.float32) -> tuple[PhantomForConditionalGeneration, PhantomProcessor]:
    """A tiny random Phantom model (eta = 1, large Phantom weights, so the Phantom path matters) and its processor."""
    tokenizer = make_tokenizer()
    config = tiny_config(tokenizer, phantom_eta=1.0)
    torch.manual_seed(0)
    model = PhantomForConditionalGeneration(config).to(dtype).eval()
    randomize_phantom_weights(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, PhantomProcessor.from_config(config, tokenizer)


def chat_with(image_block: dict) -> list[dict]:
    return [{"role": "user", "content": [image_block, {"type": "text", "text": "what is in the image ?"}]}]


def generate_reference(model, processor, chat) -> tuple[torch.Tensor, str]:
    """What `model.generate` gives on the processor's own encoding of `chat`: full ids and the decoded answer."""
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, **GREEDY)
    return output[0], processor.batch_decode(output, prompt_ids=inputs["input_ids"])[0]


@pytest.fixture(scope="module")
def model_and_processor():
    return make_model_and_processor()


@pytest.fixture(scope="module")
def saved_folder(model_and_processor, tmp_path_factory):
    model, processor = model_and_processor
    folder = tmp_path_factory.mktemp("phantom")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder_pipe(saved_folder):
    return pipeline("image-text-to-text", model=str(saved_folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "photo.png"
    random_image(80, 60, seed=11).save(path)
    return path


def image_blocks(image_file) -> dict[str, dict]:
    array = np.array(random_image(30, 90, seed=12))
    return {
        "pil": {"type": "image", "image": random_image(80, 60, seed=13)},
        "path": {"type": "image", "path": str(image_file)},
        "numpy": {"type": "image", "image": array},
    }


@pytest.mark.parametrize("kind", ["pil", "path", "numpy"])
def test_pipeline_from_saved_folder_equals_generate(model_and_processor, folder_pipe, image_file, kind):
    model, processor = model_and_processor
    pipe = folder_pipe
    assert type(pipe.processor).__name__ == "PhantomProcessor"
    chat = chat_with(image_blocks(image_file)[kind])
    expected_ids, expected_answer = generate_reference(model, processor, chat)

    tokens = pipe(text=chat, return_tensors=True, generate_kwargs=GREEDY)[0]["generated_token_ids"]
    assert tokens.tolist() == expected_ids.tolist()
    assert int((tokens == processor.image_token_id).sum()) > 0  # the image went through the pipeline

    result = pipe(text=chat, generate_kwargs=GREEDY)[0]
    assert expected_answer and result["generated_text"][:-1] == chat
    assert result["generated_text"][-1]["role"] == "assistant"
    assert result["generated_text"][-1]["content"].strip() == expected_answer


REMOTE_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from transformers import pipeline

folder, image_path = sys.argv[1], sys.argv[2]
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
image = Image.open(image_path)
results = {"model_module": type(pipe.model).__module__, "processor_module": type(pipe.processor).__module__}
for kind, block in (("pil", {"type": "image", "image": image}), ("numpy", {"type": "image", "image": np.array(image)})):
    chat = [{"role": "user", "content": [block, {"type": "text", "text": "what is in the image ?"}]}]
    out = pipe(text=chat, return_tensors=True, generate_kwargs={"do_sample": False, "max_new_tokens": %d})
    results[kind] = out[0]["generated_token_ids"].tolist()
print(json.dumps(results))
""" % MAX_NEW_TOKENS


def test_pipeline_from_folder_in_a_fresh_process_uses_remote_code(model_and_processor, saved_folder, image_file):
    """What a Hub user gets: no phantom_hf import, everything comes from the folder's remote code."""
    model, processor = model_and_processor
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(saved_folder), str(image_file)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["model_module"].startswith("transformers_modules")
    assert output["processor_module"].startswith("transformers_modules")
    image = Image.open(image_file)
    expected_ids, _ = generate_reference(model, processor, chat_with({"type": "image", "image": image}))
    assert output["pil"] == output["numpy"] == expected_ids.tolist()


def test_pipeline_with_objects_equals_generate(model_and_processor, image_file):
    model, processor = model_and_processor
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    for block in image_blocks(image_file).values():
        chat = chat_with(block)
        expected_ids, expected_answer = generate_reference(model, processor, chat)
        tokens = pipe(text=chat, return_tensors=True, generate_kwargs=GREEDY)[0]["generated_token_ids"]
        assert tokens.tolist() == expected_ids.tolist()
    assert pipe(text=chat, generate_kwargs=GREEDY)[0]["generated_text"][-1]["content"].strip() == expected_answer

    # plain prompt with an <image> marker instead of a chat
    image = random_image(80, 60, seed=14)
    prompt = "<image> what is in the image ?"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)[0]
    tokens = pipe(images=image, text=prompt, return_tensors=True, generate_kwargs=GREEDY)[0]["generated_token_ids"]
    assert tokens.tolist() == expected.tolist()


def test_batched_generation_with_mixed_image_counts_equals_single_rows():
    """Left-padded rows with 2, 0 and 1 images generate what each row generates alone (greedy and beams)."""
    model, processor = make_model_and_processor(torch.float64)
    images = [random_image(80, 60, 1), random_image(30, 90, 2), random_image(56, 28, 3)]
    texts = [
        processor.apply_chat_template(chat, add_generation_prompt=True)
        for chat in (
            [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is in the image ?"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "be brief ."}]}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a cat ?"}]}],
        )
    ]
    per_row_images = [images[:2], [], images[2:]]
    batch = processor(images=per_row_images, text=texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0  # left padding, as the tokenizer says
    for copies, settings in ((1, GREEDY), (2, {**GREEDY, "num_beams": 2, "num_return_sequences": 2})):
        with torch.no_grad():
            batched = model.generate(**batch, **settings)
        answers = processor.batch_decode(batched, prompt_ids=batch["input_ids"].repeat_interleave(copies, dim=0))
        if copies == 1:
            assert len(set(answers)) == len(texts)  # rows answer differently, so a row mix-up would show
        for row, (text, row_images) in enumerate(zip(texts, per_row_images)):
            single = processor(images=row_images or None, text=text, return_tensors="pt")
            with torch.no_grad():
                alone = model.generate(**single, **settings)
            expected = processor.batch_decode(alone, prompt_ids=single["input_ids"].repeat(copies, 1))
            assert answers[row * copies : (row + 1) * copies] == expected
