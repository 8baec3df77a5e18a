"""`answering.answer_questions`, the one function that asks a model: its answers are the transformers pipeline's
for the same chat, batched answers equal one-by-one answers, and a streamer receives exactly the returned answer."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import TextIteratorStreamer, pipeline

from phantom_hf import PhantomForConditionalGeneration
from phantom_hf.answering import answer_question, answer_questions
from phantom_hf.modeling.processing_phantom import PhantomProcessor
from phantom_hf.synthetic import generate_examples, vocabulary
from phantom_hf.tiny import tiny_phantom_config
from phantom_hf.tokenization import build_tokenizer

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def tiny() -> tuple[PhantomForConditionalGeneration, PhantomProcessor]:
    """A tiny Phantom model with large random weights (so that answers depend on the image) and its processor."""
    tokenizer = build_tokenizer(vocabulary(), padding_side="right")
    config = tiny_phantom_config(
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), text_config={"vocab_size": len(tokenizer)}
    )
    torch.manual_seed(0)
    model = PhantomForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.3)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, PhantomProcessor.from_config(config, tokenizer, max_patches=1)


def chat(example) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": example.image}, {"type": "text", "text": example.question}]}]


def test_answers_equal_the_pipeline_and_batches_equal_single_questions(tiny) -> None:
    model, processor = tiny
    examples = generate_examples(3, seed=5, image_size=28)
    reference = pipeline("image-text-to-text", model=model, processor=processor)
    expected = [
        reference(text=chat(example), max_new_tokens=NEW_TOKENS, return_full_text=False, generate_kwargs={"do_sample": False})[0][
            "generated_text"
        ].strip()
        for example in examples
    ]
    assert len(set(expected)) > 1  # the answers depend on the image: the test can tell images apart
    questions = [example.question for example in examples]
    images = [example.image for example in examples]
    processor.tokenizer.padding_side = "right"  # (the pipeline sets it to left) answer_questions pads left, then restores it
    assert answer_questions(model, processor, questions, images, max_new_tokens=NEW_TOKENS) == expected  # one batch
    assert answer_questions(model, processor, [chat(example) for example in examples], batch_size=2, max_new_tokens=NEW_TOKENS) == expected
    assert [answer_question(model, processor, image, question, NEW_TOKENS) for image, question in zip(images, questions)] == expected
    # a question holding its <image> marker is asked as written (the demo's and the trainer's prompts)
    assert answer_questions(model, processor, [f"<image>\n{questions[0]}"], [images[0]], max_new_tokens=NEW_TOKENS) == expected[:1]
    assert processor.tokenizer.padding_side == "right"  # restored


def test_streamer_receives_the_answer(tiny) -> None:
    model, processor = tiny
    example = generate_examples(1, seed=7, image_size=28)[0]
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    answers: list[str] = []
    worker = threading.Thread(
        target=lambda: answers.extend(
            answer_questions(model, processor, [example.question], [example.image], streamer=streamer, max_new_tokens=NEW_TOKENS)
        )
    )
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    assert streamed.strip() == answers[0] != ""


def test_bad_requests_are_refused(tiny) -> None:
    model, processor = tiny
    example = generate_examples(1, seed=7, image_size=28)[0]
    with pytest.raises(ValueError, match="one entry per question"):
        answer_questions(model, processor, ["a", "b"], [example.image])
    with pytest.raises(ValueError, match="streams one answer"):
        answer_questions(model, processor, ["a", "b"], streamer=object())
    with pytest.raises(TypeError, match="list of questions"):
        answer_questions(model, processor, "what?")
    with pytest.raises(ValueError, match="put its images in its messages"):
        answer_questions(model, processor, [chat(example)], [example.image])
    with pytest.raises(ValueError, match="the question is empty"):
        answer_question(model, processor, None, "  ")
