"""A chat page for a Phantom model: `phantom-hf app MODEL`, and the app of the Space that `phantom-hf push --space`
writes. Needs Gradio (`pip install "phantom-hf[app]"`).

The page: images uploaded with each question (several per turn), a multi-turn conversation that keeps the earlier
turns' images, the answer streamed token by token (transformers' `TextIteratorStreamer`, `generate` in a thread),
the generation settings (max new tokens, greedy or sampling, temperature, beams: streamed with one beam, shown when
complete with more), a stop button, and the published per-benchmark instruction suffixes (`phantom_hf.prompts`).

The prompt is written by the processor's chat template exactly as `pipeline("image-text-to-text")` writes it
(`generate_answer`), so a greedy answer on the page is the pipeline's answer token for token.

Sessions: each browser tab (and each API client) has its own conversation in a `gr.State`; only the model and
processor are shared. Gradio's queue runs up to `CONCURRENT_GENERATIONS` answers at once, each `generate` in its own
thread on the shared model (generation keeps its cache and state per call), so a long answer in one session does not
hold up another's; the stop button and the settings bypass the queue. Errors (an image that cannot be decoded, a
conversation longer than the model's context) appear in the page as one line, and the server goes on serving.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .answering import answer_questions
from .modeling.processing_phantom import to_rgb_array
from .prompts import BENCHMARK_PROMPTS, apply_benchmark_prompt, benchmark_prompt

# Answers generated at once (Gradio's default is 1: one long answer would hold up every other session).
CONCURRENT_GENERATIONS = 4
DEFAULT_MAX_NEW_TOKENS = 256
NO_BENCHMARK = "none"
GREEDY, SAMPLING = "greedy", "sampling"


def generate_answer(
    model: Any,
    processor: Any,
    messages: list[dict[str, Any]],
    streamer: Any = None,
    **generate_kwargs: Any,
) -> str:
    """The model's answer to the chat `messages` (transformers' chat format: each turn a role and a list of
    `{"type": "image", "image": ...}` / `{"type": "text", "text": ...}` blocks), through the library's one way of
    asking a model (`answering.answer_questions`): the prompt is the chat template's, as `pipeline("image-text-to-text")`
    makes it, and `max_new_tokens` is lowered to the room the model's context leaves (a conversation that leaves
    none is refused with a `ValueError` before generating).
    """
    return answer_questions(model, processor, [messages], streamer=streamer, **generate_kwargs)[0]


class ChatSession:
    """One page's conversation: the chat as the model reads it (images decoded), the chat as the page shows it
    (image files), whether an answer is being generated and whether the stop button was pressed during it."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.shown: list[dict[str, Any]] = []
        self.busy = False
        self.stop_requested = False


class _StopRequested(StoppingCriteria):
    """Ends generation at the next token once the session's stop button was pressed."""

    def __init__(self, session: ChatSession) -> None:
        self.session = session

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.session.stop_requested, dtype=torch.bool, device=input_ids.device)


def generation_settings(max_new_tokens: float, decoding: str, temperature: float, num_beams: float) -> dict[str, Any]:
    """The page's generation controls as `generate` keyword arguments, checked (a `ValueError` names the control)."""
    if decoding not in (GREEDY, SAMPLING):
        raise ValueError(f"decoding must be {GREEDY!r} or {SAMPLING!r}, got {decoding!r}")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max new tokens must be a whole number >= 1, got {max_new_tokens!r}")
    if int(num_beams) != num_beams or num_beams < 1:
        raise ValueError(f"beams must be a whole number >= 1, got {num_beams!r}")
    settings: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "num_beams": int(num_beams)}
    if decoding == SAMPLING:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        settings.update(do_sample=True, temperature=float(temperature))
    else:
        settings["do_sample"] = False
    return settings


def user_turn(text: str, image_files: list[str], benchmark: str = NO_BENCHMARK) -> dict[str, Any]:
    """The user's turn as the model reads it: each image file decoded (a `ValueError` naming the file when it is
    not an image), then the question, with the benchmark's published suffix when one is chosen."""
    if not text or not text.strip():
        raise ValueError("the question is empty")
    if benchmark != NO_BENCHMARK:
        text = apply_benchmark_prompt(text, benchmark, image=False)
    content: list[dict[str, Any]] = [
        {"type": "image", "image": to_rgb_array(path, name=f"image file {Path(path).name!r}")} for path in image_files
    ]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _one_line(error: BaseException) -> str:
    from .cli import _one_line as cli_one_line

    return "error: " + cli_one_line(error)


def build_app(model: Any, processor: Any, title: str | None = None) -> Any:
    """The Gradio page (a `gr.Blocks`, its queue set) chatting with `model` through `processor`."""
    import gradio as gr

    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 4096
    title = title or Path(str(getattr(model.config, "_name_or_path", "") or "Phantom model")).name

    def respond(
        message: dict[str, Any] | None,
        session: ChatSession,
        max_new_tokens: float,
        decoding: str,
        temperature: float,
        num_beams: float,
        benchmark: str,
    ) -> Iterator[tuple[Any, str, Any]]:
        message = message or {}
        files = [str(file) for file in message.get("files") or []]
        if session.busy:
            yield session.shown, "error: wait for the answer (or press Stop) before asking again", gr.update()
            return
        try:
            settings = generation_settings(max_new_tokens, decoding, temperature, num_beams)
            turn = user_turn(message.get("text") or "", files, benchmark)
        except (ValueError, TypeError) as error:
            yield session.shown, _one_line(error), gr.update()
            return
        shown_question = {"role": "user", "content": [*({"path": file} for file in files), turn["content"][-1]["text"]]}
        shown = [*session.shown, shown_question]
        session.busy, session.stop_requested = True, False
        try:
            yield [*shown, {"role": "assistant", "content": ""}], "", gr.update(value=None, interactive=False)
            streamer = None
            if settings["num_beams"] == 1:
                streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: dict[str, Any] = {}

            def run() -> None:
                try:
                    result["answer"] = generate_answer(
                        model,
                        processor,
                        [*session.messages, turn],
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_StopRequested(session)]),
                        **settings,
                    )
                except Exception as error:  # shown in the page; the server goes on
                    result["error"] = error
                    if streamer is not None:
                        streamer.end()

            thread = threading.Thread(target=run, name="phantom-hf-generate", daemon=True)
            thread.start()
            partial = ""
            for piece in streamer if streamer is not None else ():
                partial += piece
                yield [*shown, {"role": "assistant", "content": partial}], "", gr.update()
            thread.join()
            if "error" in result:
                yield session.shown, _one_line(result["error"]), gr.update(value=message, interactive=True)
                return
            answer = result["answer"]
            session.messages += [turn, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            session.shown = [*shown, {"role": "assistant", "content": answer}]
            yield session.shown, "", gr.update(interactive=True)
        finally:  # also when the page went away mid-answer: its generation ends at the next token
            session.stop_requested = True
            session.busy = False

    def stop(session: ChatSession) -> None:
        session.stop_requested = True

    def clear(session: ChatSession) -> tuple[list, str]:
        if not session.busy:
            session.messages, session.shown = [], []
        return session.shown, ""

    def benchmark_tokens(benchmark: str) -> Any:
        if benchmark == NO_BENCHMARK:
            return gr.update()
        return gr.update(value=min(benchmark_prompt(benchmark).max_new_tokens, context))

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nUpload images, ask about them; the conversation keeps earlier images.")
        session = gr.State(ChatSession)
        chatbot = gr.Chatbot(label="Conversation", elem_id="conversation", height=600, buttons=["copy", "copy_all"])
        error = gr.Markdown("", elem_id="error-line")
        question = gr.MultimodalTextbox(
            placeholder="Ask about the images (attach several with the clip)",
            file_types=["image"],
            file_count="multiple",
            sources=["upload"],
            show_label=False,
            elem_id="question",
        )
        with gr.Row():
            stop_button = gr.Button("Stop", elem_id="stop", variant="stop")
            clear_button = gr.Button("New conversation", elem_id="clear")
        with gr.Accordion("Generation", open=False, elem_id="generation"):
            max_new_tokens = gr.Slider(
                1,
                context,
                value=min(DEFAULT_MAX_NEW_TOKENS, context),
                step=1,
                label="Max new tokens",
                elem_id="max-new-tokens",
            )
            decoding = gr.Radio([GREEDY, SAMPLING], value=GREEDY, label="Decoding", elem_id="decoding")
            temperature = gr.Slider(
                0.05, 2.0, value=0.7, step=0.05, label="Temperature (sampling)", elem_id="temperature"
            )
            num_beams = gr.Slider(
                1, 8, value=1, step=1, label="Beams (more than 1: the answer appears when complete)", elem_id="beams"
            )
            benchmark = gr.Dropdown(
                [NO_BENCHMARK, *sorted(BENCHMARK_PROMPTS)],
                value=NO_BENCHMARK,
                label="Published benchmark instruction (appended to the question; sets its answer length)",
                elem_id="benchmark",
            )
        question.submit(
            respond,
            [question, session, max_new_tokens, decoding, temperature, num_beams, benchmark],
            [chatbot, error, question],
            api_name="chat",
        )
        stop_button.click(stop, session, None, queue=False, api_name="stop")
        clear_button.click(clear, session, [chatbot, error], queue=False, api_name="clear")
        chatbot.clear(clear, session, [chatbot, error], queue=False, api_name=False)  # the conversation's own bin
        benchmark.change(benchmark_tokens, benchmark, max_new_tokens, queue=False, api_name=False)
    return demo.queue(default_concurrency_limit=CONCURRENT_GENERATIONS)


def launch(
    model: Any,
    processor: Any,
    host: str | None = None,
    port: int | None = None,
    title: str | None = None,
    **kwargs: Any,
) -> Any:
    """Serve the page on `host:port` (None: Gradio's defaults, 127.0.0.1:7860 unless GRADIO_SERVER_NAME /
    GRADIO_SERVER_PORT say otherwise); blocks until the server stops unless `prevent_thread_lock=True`."""
    model.eval()
    return build_app(model, processor, title=title).launch(server_name=host, server_port=port, **kwargs)


__all__ = [
    "CONCURRENT_GENERATIONS",
    "ChatSession",
    "build_app",
    "generate_answer",
    "generation_settings",
    "launch",
    "user_turn",
]
