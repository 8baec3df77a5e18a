"""Asking a Phantom model: questions (or chats) and images in, decoded answers out.

`answer_questions` is the one place where the library turns questions into `generate` calls: `phantom-hf chat`,
the demo's evaluation, the lmms-eval model (`PhantomLMMS.generate_until`) and apps (a Gradio chat streaming its
answer) call it. It writes each question as a user turn with the processor's chat template
(`PhantomProcessor.user_prompt`, so the image markers are placed as the model's format places them), pads the batch
on the left (the side `generate` appends to), pads with the tokenizer's pad token (its EOS token when it has none),
and decodes only the new tokens (`PhantomProcessor.batch_decode(prompt_ids=...)`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .modeling.processing_phantom import IMAGE_MARKER

# A chat: a list of messages `{"role": ..., "content": str | [{"type": "image", "image": ...}, {"type": "text", ...}]}`.
Chat = Sequence[Mapping[str, Any]]


def question_prompt(processor: Any, question: str, images: int) -> str:
    """`question` as one user turn with `images` image blocks before the text, followed by the generation prompt.
    A question that already holds `<image>` markers keeps them and gets no image blocks."""
    return processor.user_prompt(question, images=0 if IMAGE_MARKER in question else images)


def pad_token_id(tokenizer: Any) -> int | None:
    """The id `generate` pads finished rows and batches with: the tokenizer's pad token, else its EOS token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _chat_images(chat: Chat) -> list[Any]:
    """The images of a chat's content blocks (`{"type": "image", "image" | "url" | "path": ...}`), in order."""
    images = []
    for message in chat:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            for block in content:
                if isinstance(block, Mapping) and block.get("type") == "image":
                    images.append(next((block[key] for key in ("image", "url", "path") if block.get(key) is not None), None))
    if any(image is None for image in images):
        raise ValueError("an image block of the chat has no image (give it as 'image', 'url' or 'path')")
    return images


def _as_image_list(images: Any) -> list[Any]:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _prompts_and_images(processor: Any, questions: Sequence[str | Chat], images: Sequence[Any] | None) -> tuple[list[str], list[list[Any]]]:
    if images is not None and len(images) != len(questions):
        raise ValueError(f"got {len(questions)} question(s) but {len(images)} image entries: give one entry per question")
    prompts, rows = [], []
    for index, question in enumerate(questions):
        given = _as_image_list(images[index]) if images is not None else []
        if isinstance(question, str):
            prompts.append(question_prompt(processor, question, len(given)))
            rows.append(given)
        elif isinstance(question, Sequence) and all(isinstance(message, Mapping) for message in question):
            if given:
                raise ValueError(f"question {index} is a chat: put its images in its messages, not in `images`")
            prompts.append(processor.apply_chat_template(list(question), tokenize=False, add_generation_prompt=True))
            rows.append(_chat_images(question))
        else:
            raise TypeError(f"question {index} must be a string or a chat (a list of message dicts), got {type(question).__name__}")
    return prompts, rows


def model_inputs(model: Any, processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
    """The processor's tensors for rendered `prompts` and their images (one list per prompt; images are passed only
    when some prompt has some), padded on the tokenizer's `padding_side`: those `model.forward` accepts, on the
    model's device, pixel values in the model's dtype."""
    encoded = processor(text=list(prompts), images=list(images) if any(images) else None, return_tensors="pt", padding=True)
    accepted = set(inspect.signature(model.forward).parameters)
    inputs = {key: value.to(model.device) for key, value in encoded.items() if key in accepted}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _within_context(model: Any, prompt_length: int, generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generate_kwargs` with `max_new_tokens` lowered to the room the model's context (`max_position_embeddings`)
    leaves after a prompt of `prompt_length` tokens; a prompt that fills the context is refused."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is None:
        return generate_kwargs
    if prompt_length >= context:
        raise ValueError(
            f"the prompt is {prompt_length} tokens, the model's context {context}: shorten the question or start a "
            "new conversation"
        )
    if generate_kwargs.get("max_new_tokens") is None:
        return generate_kwargs
    return {**generate_kwargs, "max_new_tokens": min(generate_kwargs["max_new_tokens"], context - prompt_length)}


def answer_questions(
    model: Any,
    processor: Any,
    questions: Sequence[str | Chat],
    images: Sequence[Any] | None = None,
    *,
    batch_size: int | None = None,
    streamer: Any = None,
    **generate_kwargs: Any,
) -> list[str]:
    """The model's answers to `questions`, decoded and stripped, in order.

    Args:
        model: a Phantom model (or any image-text-to-text model whose processor has `user_prompt`).
        processor: its `PhantomProcessor`.
        questions: each a question (a string, asked as one user turn; `<image>` markers in it say where its images
            go, else they go before the text) or a chat (a list of messages, rendered by the chat template with the
            generation prompt; its images are those of its `{"type": "image", "image": ...}` blocks).
        images: for string questions, one entry per question: an image, a list of images, or None (text only).
            Images are anything the processor decodes (PIL image, array, path, URL, bytes).
        batch_size: questions per `generate` call (default: all at once); rows are padded on the left.
        streamer: a transformers streamer (e.g. `TextIteratorStreamer(processor.tokenizer, skip_prompt=True)`)
            that receives the tokens as they are generated; only with a single question.
        **generate_kwargs: `generate` options (`max_new_tokens`, `do_sample`, `temperature`, `num_beams`, ...).
            Decoding is greedy unless `do_sample` says otherwise; `pad_token_id` defaults to `pad_token_id(tokenizer)`.
            `max_new_tokens` is lowered to the room the model's context leaves; a prompt that fills the context is
            refused with a `ValueError`.
    """
    if isinstance(questions, str):
        raise TypeError("questions must be a list of questions; for one question pass [question]")
    prompts, rows = _prompts_and_images(processor, questions, images)
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"a streamer streams one answer: got {len(prompts)} questions")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = processor.tokenizer
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", pad_token_id(tokenizer))
    step = batch_size or max(1, len(prompts))
    answers: list[str] = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(prompts), step):
            inputs = model_inputs(model, processor, prompts[start : start + step], rows[start : start + step])
            within = _within_context(model, inputs["input_ids"].shape[1], generate_kwargs)
            with torch.no_grad():
                output = model.generate(**inputs, streamer=streamer, **within)
            answers.extend(answer.strip() for answer in processor.batch_decode(output, prompt_ids=inputs["input_ids"]))
    finally:
        tokenizer.padding_side = padding_side
    return answers


def answer_question(model: Any, processor: Any, image: Any, question: str | Chat, max_new_tokens: int = 32, **generate_kwargs: Any) -> str:
    """The model's answer to one question about `image` (None: a text-only question); see `answer_questions`."""
    if isinstance(question, str) and not question.strip():
        raise ValueError("the question is empty")
    return answer_questions(model, processor, [question], [image], max_new_tokens=max_new_tokens, **generate_kwargs)[0]


__all__ = ["answer_question", "answer_questions", "model_inputs", "pad_token_id", "question_prompt"]
