"""The chat page (`phantom-hf app`, phantom_hf.app) through its API with `gradio_client`, against a tiny saved model
served on 127.0.0.1: greedy answers equal `pipeline("image-text-to-text")`'s tokens (one and several images, a second
turn keeping the first image, beams, a benchmark instruction), the answer streams, the stop button ends it, errors are
one line and the server goes on, and two clients at once keep their own conversations, one answering while the
other's generation is held."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import pipeline

from phantom_hf.app import generate_answer, generation_settings, user_turn
from phantom_hf.prompts import MULTIPLE_CHOICE_SUFFIX

from .test_pipeline import make_model_and_processor
from .test_processor import random_image

QUESTION = "what is in the image ?"
MAX_NEW_TOKENS = 10
# The page's inputs after the question: max new tokens, decoding, temperature, beams, benchmark.
GREEDY_SETTINGS = (MAX_NEW_TOKENS, "greedy", 0.7, 1, "none")
TIMEOUT = 120


def app_model_and_processor() -> tuple[Any, Any]:
    """The pipeline tests' tiny model with every matrix redrawn larger, so that its greedy answers differ from image
    to image and turn to turn (with the small initial weights they repeat one word)."""
    model, processor = make_model_and_processor()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model, processor


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_tiny_app_model(folder: Path) -> None:
    model, processor = app_model_and_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def save_png(folder: Path, name: str, seed: int, size: tuple[int, int] = (80, 60)) -> Path:
    path = folder / name
    random_image(*size, seed=seed).save(path)
    return path


def pipeline_answer(pipe: Any, chat: list[dict[str, Any]], **generate_kwargs: Any) -> str:
    """The answer `pipeline("image-text-to-text")` gives to `chat`: its new token ids, decoded without special
    tokens (as the page's streamer decodes them)."""
    settings = {"do_sample": False, "max_new_tokens": MAX_NEW_TOKENS, **generate_kwargs}
    ids = pipe(text=chat, return_tensors=True, generate_kwargs=settings)[0]["generated_token_ids"]
    prompt = pipe.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    answer = pipe.processor.decode(ids[len(prompt["input_ids"][0]) :], skip_special_tokens=True)
    text = pipe(text=chat, generate_kwargs=settings)[0]["generated_text"][-1]["content"]
    assert text.strip() == answer.strip()  # the pipeline's own text says the same
    return answer


def user(text: str, *images: Path) -> dict[str, Any]:
    return {"role": "user", "content": [*({"type": "image", "path": str(image)} for image in images), {"type": "text", "text": text}]}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_generation_settings_and_user_turn_are_checked(tmp_path: Path) -> None:
    assert generation_settings(5, "greedy", 0.7, 1) == {"max_new_tokens": 5, "num_beams": 1, "do_sample": False}
    assert generation_settings(5, "sampling", 0.5, 2) == {
        "max_new_tokens": 5, "num_beams": 2, "do_sample": True, "temperature": 0.5
    }  # fmt: skip
    with pytest.raises(ValueError, match="max new tokens"):
        generation_settings(0, "greedy", 0.7, 1)
    with pytest.raises(ValueError, match="beams"):
        generation_settings(5, "greedy", 0.7, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        generation_settings(5, "sampling", 0.0, 1)
    with pytest.raises(ValueError, match="decoding"):
        generation_settings(5, "beam", 0.7, 1)
    with pytest.raises(ValueError, match="the question is empty"):
        user_turn("  ", [])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="image file 'bad.png' cannot be decoded"):
        user_turn("what ?", [str(bad)])
    assert user_turn("Which?", [], "mmbench")["content"] == [{"type": "text", "text": "Which?" + MULTIPLE_CHOICE_SUFFIX}]


LONG_QUESTION = "what is in the image ? " * 100  # 600 tokens: over the tiny model's context of 512


def test_generate_answer_is_the_pipeline_answer_and_stays_within_the_context(tmp_path: Path) -> None:
    model, processor = app_model_and_processor()
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    chat = [user(QUESTION, save_png(tmp_path, "a.png", seed=1))]
    answer = generate_answer(model, processor, chat, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    assert answer and answer == pipeline_answer(pipe, chat)
    prompt_length = len(processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)[0])
    room = 512 - prompt_length
    # the answer may run to the end of the context, not past it: as if max_new_tokens were the room left
    long = generate_answer(model, processor, chat, do_sample=False, max_new_tokens=1000, min_new_tokens=1000)
    assert long == generate_answer(model, processor, chat, do_sample=False, max_new_tokens=room, min_new_tokens=room)
    assert len(processor.tokenizer(long, add_special_tokens=False)["input_ids"]) <= room
    # too long a prompt: the processor refuses it (its tokenizer's model_max_length) ...
    with pytest.raises(ValueError, match="605 tokens long .* more than the maximum length 512"):
        generate_answer(model, processor, [user(LONG_QUESTION)], do_sample=False, max_new_tokens=5)
    # ... and where the tokenizer states no maximum, the model's context does
    processor.tokenizer.model_max_length = int(1e30)
    with pytest.raises(ValueError, match="the prompt is 605 tokens, the model's context 512"):
        generate_answer(model, processor, [user(LONG_QUESTION)], do_sample=False, max_new_tokens=5)


# --------------------------------------------------------------------------------------------- the served page

requires_gradio = pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None, reason='the chat page needs Gradio: pip install "phantom-hf[app]"'
)


class GenerateGate:
    """Holds the next `generate` call of `model` at its start until `release` is set (the page's answer is then
    "in progress" for as long as the test wants, without relying on timing)."""

    def __init__(self, model: Any) -> None:
        self.original = model.generate
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.release.wait(TIMEOUT), "the test never released the held generation"
        return self.original(*args, **kwargs)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A saved tiny model loaded as `phantom-hf app` loads it, served on 127.0.0.1; its pipeline; a generate gate."""
    from phantom_hf.app import build_app
    from phantom_hf.cli import _load_model_and_processor

    folder = tmp_path_factory.mktemp("app-model")
    save_tiny_app_model(folder)
    model, processor = _load_model_and_processor(str(folder))
    model.eval()
    gate = GenerateGate(model)
    model.generate = gate.generate
    demo = build_app(model, processor)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    yield demo, pipe, gate, tmp_path_factory.mktemp("app-images")
    demo.close()


def client(url: str) -> Any:
    import gradio_client

    return gradio_client.Client(url, verbose=False)


def ask(session: Any, text: str, *images: Path, settings: tuple = GREEDY_SETTINGS) -> Any:
    """Submit one question (the page's `chat` event); returns the job."""
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(image)) for image in images]}
    return session.submit(message, *settings, api_name="/chat")


def answer_of(output: Any) -> str:
    """The last assistant text of the page's conversation in one output of the `chat` event."""
    conversation = output[0]
    assert conversation[-1]["role"] == "assistant"
    return "".join(part["text"] for part in conversation[-1]["content"] if part["type"] == "text")


@requires_gradio
def test_answers_stream_and_equal_the_pipeline_over_two_turns(served: Any) -> None:
    demo, pipe, _, images = served
    first, second, third = (save_png(images, f"{name}.png", seed) for name, seed in (("a", 1), ("b", 2), ("c", 3)))
    session = client(demo.local_url)

    job = ask(session, QUESTION, first, second)
    final = job.result(timeout=TIMEOUT)
    answer = answer_of(final)
    expected = pipeline_answer(pipe, [user(QUESTION, first, second)])
    assert answer == expected and len(expected.split()) >= 3
    assert final[1] == ""  # no error line
    partial = [answer_of(output) for output in job.outputs()[:-1] if output[0] and output[0][-1]["role"] == "assistant"]
    growing = [text for text in dict.fromkeys(partial) if text]
    assert len(growing) >= 2 and all(answer.startswith(text) for text in growing)  # streamed, word by word

    second_turn = "and what about this one ?"
    final = ask(session, second_turn, third).result(timeout=TIMEOUT)
    expected_second = pipeline_answer(
        pipe, [user(QUESTION, first, second), assistant(expected), user(second_turn, third)]
    )
    assert answer_of(final) == expected_second
    assert expected_second != pipeline_answer(pipe, [user(second_turn, third)])  # the earlier turn mattered
    assert [message["role"] for message in final[0]] == ["user", "assistant", "user", "assistant"]

    session.predict(api_name="/clear")
    final = ask(session, second_turn, third).result(timeout=TIMEOUT)
    assert answer_of(final) == pipeline_answer(pipe, [user(second_turn, third)]) and len(final[0]) == 2


@requires_gradio
def test_beams_and_benchmark_instructions_give_the_pipeline_answer(served: Any) -> None:
    demo, pipe, _, images = served
    image = save_png(images, "beams.png", seed=4)
    session = client(demo.local_url)
    job = ask(session, QUESTION, image, settings=(MAX_NEW_TOKENS, "greedy", 0.7, 3, "none"))
    final = job.result(timeout=TIMEOUT)
    assert answer_of(final) == pipeline_answer(pipe, [user(QUESTION, image)], num_beams=3)
    assert {answer_of(output) for output in job.outputs()[:-1] if output[0]} <= {""}  # beams: shown when complete

    session.predict(api_name="/clear")
    final = ask(session, "Which animal ?", image, settings=(MAX_NEW_TOKENS, "greedy", 0.7, 1, "mmbench")).result(TIMEOUT)
    assert answer_of(final) == pipeline_answer(pipe, [user("Which animal ?" + MULTIPLE_CHOICE_SUFFIX, image)])


@requires_gradio
def test_errors_are_one_line_and_the_server_goes_on(served: Any) -> None:
    demo, pipe, _, images = served
    bad = images / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    image = save_png(images, "fine.png", seed=5)
    session = client(demo.local_url)

    conversation, error, _ = ask(session, QUESTION, bad).result(timeout=TIMEOUT)
    assert error.startswith("error: image file 'broken.png'") and "\n" not in error and conversation == []
    conversation, error, _ = ask(session, LONG_QUESTION, image).result(timeout=TIMEOUT)
    assert error.startswith("error: prompt 0 is") and "more than the maximum length 512" in error
    assert conversation == [] and "\n" not in error

    final = ask(session, QUESTION, image).result(timeout=TIMEOUT)
    assert final[1] == "" and answer_of(final) == pipeline_answer(pipe, [user(QUESTION, image)])


@requires_gradio
def test_stop_ends_the_answer_at_the_next_token(served: Any) -> None:
    demo, pipe, gate, images = served
    image = save_png(images, "stop.png", seed=6)
    full = pipeline_answer(pipe, [user(QUESTION, image)])
    session = client(demo.local_url)
    gate.armed = True
    job = ask(session, QUESTION, image)
    assert gate.entered.wait(TIMEOUT)
    gate.entered.clear()
    session.predict(api_name="/stop")
    gate.release.set()
    gate.release.clear()
    stopped = answer_of(job.result(timeout=TIMEOUT))
    assert stopped == full.split()[0]  # one token, then the stop criterion


@requires_gradio
def test_two_clients_keep_their_own_conversations_and_one_answers_while_the_other_generates(served: Any) -> None:
    demo, pipe, gate, images = served
    image_a, image_b = save_png(images, "one.png", seed=7), save_png(images, "two.png", seed=8, size=(40, 90))
    alice, bob = client(demo.local_url), client(demo.local_url)

    gate.armed = True
    held = ask(alice, QUESTION, image_a)
    assert gate.entered.wait(TIMEOUT)  # Alice's generation has started and is held
    try:
        bob_first = ask(bob, "where is it ?", image_b).result(timeout=TIMEOUT)
        assert not held.done()
    finally:
        gate.release.set()
    gate.entered.clear()
    gate.release.clear()
    alice_first = held.result(timeout=TIMEOUT)
    assert answer_of(alice_first) == pipeline_answer(pipe, [user(QUESTION, image_a)])
    assert answer_of(bob_first) == pipeline_answer(pipe, [user("where is it ?", image_b)])

    # Both ask a second question at once: each continues its own conversation.
    jobs = {name: ask(session, "and then ?") for name, session in (("alice", alice), ("bob", bob))}
    finals = {name: job.result(timeout=TIMEOUT) for name, job in jobs.items()}
    assert answer_of(finals["alice"]) == pipeline_answer(
        pipe, [user(QUESTION, image_a), assistant(answer_of(alice_first)), user("and then ?")]
    )
    assert answer_of(finals["bob"]) == pipeline_answer(
        pipe, [user("where is it ?", image_b), assistant(answer_of(bob_first)), user("and then ?")]
    )
    assert [len(final[0]) for final in finals.values()] == [4, 4]


def serve_and_ask(command: list[str], cwd: Path, port: int, image: Path, **env: str) -> Any:
    """Start a page server (`command`, in its own process, on 127.0.0.1:`port`), wait for its page, ask one greedy
    question about `image` through the API, stop the server; returns the final output of the `chat` event."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **env}
    server = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert server.poll() is None, f"{command} exited: {server.stdout.read()}"
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{command} did not serve its page in time"
                time.sleep(0.5)
        return ask(client(url), QUESTION, image).result(timeout=TIMEOUT)
    finally:
        server.terminate()
        server.wait(timeout=30)


@requires_gradio
def test_the_command_and_a_written_space_serve_the_page(tmp_path: Path) -> None:
    """`phantom-hf app FOLDER --port P`, and the Space `phantom-hf push --space` writes (its app.py run as a Space
    runs it, the address and port from Gradio's environment variables, the package from the Space's own copy), each
    in its own process: the page answers as the pipeline does."""
    from phantom_hf.hub import write_space_folder

    folder = tmp_path / "model"
    save_tiny_app_model(folder)
    image = save_png(tmp_path, "cli.png", seed=9)
    model, processor = app_model_and_processor()
    expected = pipeline_answer(pipeline("image-text-to-text", model=model, processor=processor), [user(QUESTION, image)])

    port = free_port()
    command = [sys.executable, "-m", "phantom_hf.cli", "app", str(folder), "--host", "127.0.0.1", "--port", str(port)]
    assert answer_of(serve_and_ask(command, tmp_path, port, image)) == expected

    space = tmp_path / "space"
    write_space_folder(space, str(folder))
    vendored = subprocess.run(
        [sys.executable, "-c", "import phantom_hf.app; print(phantom_hf.app.__file__)"],
        cwd=space, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(vendored.stdout.strip()) == space / "phantom_hf" / "app.py"
    port = free_port()
    final = serve_and_ask(
        [sys.executable, "app.py"], space, port, image, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port)
    )
    assert answer_of(final) == expected
