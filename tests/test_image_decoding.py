"""One image decoder (`PhantomProcessor`): float, 16-bit and alpha images give the pixels of their uint8 RGB
equivalent; paths and bytes keep alpha and EXIF orientation like PIL inputs; unusable dtypes are refused by
name; an undecodable file leaves no handle open."""

from __future__ import annotations

import gc
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from .test_processor import random_image, tiny_processor


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def pixels(processor, image) -> torch.Tensor:
    return processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]


def test_float_images_in_0_1_give_the_pixels_of_the_uint8_image(processor) -> None:
    rgb = np.asarray(random_image(56, 28, seed=1))
    reference = pixels(processor, rgb)
    as_float = rgb.astype(np.float32) / 255  # what ToTensor() holds
    torch.testing.assert_close(pixels(processor, as_float), reference, rtol=0, atol=0)
    torch.testing.assert_close(pixels(processor, torch.from_numpy(as_float).permute(2, 0, 1)), reference, rtol=0, atol=0)
    torch.testing.assert_close(pixels(processor, torch.from_numpy(as_float).permute(2, 0, 1).half()), reference, rtol=0, atol=0)
    torch.testing.assert_close(pixels(processor, rgb.astype(np.float64)), reference, rtol=0, atol=0)  # floats 0-255
    rgba = np.asarray(random_image(56, 28, seed=2, mode="RGBA"))
    torch.testing.assert_close(pixels(processor, rgba.astype(np.float32) / 255), pixels(processor, rgba), rtol=0, atol=0)
    assert pixels(processor, as_float).mean() > -1  # not the near-black of a double 1/255 rescale


def test_sixteen_bit_images_are_scaled_not_clipped(processor, tmp_path: Path) -> None:
    gray = np.asarray(random_image(56, 28, seed=3, mode="L"))
    reference = pixels(processor, gray)
    wide = gray.astype(np.uint16) * 257  # the same picture with 16-bit values
    image = Image.fromarray(wide)  # mode I;16
    image.save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode in ("I;16", "I")
    for source in (image, tmp_path / "gray16.png", (tmp_path / "gray16.png").read_bytes(), wide):
        torch.testing.assert_close(pixels(processor, source), reference, rtol=0, atol=0)


@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.ones((28, 28, 3), dtype=bool), TypeError, "image 0 .*has dtype bool: pass uint8"),
        (np.ones((28, 28, 3), dtype=np.complex64), TypeError, "has dtype complex64"),
        (np.full((28, 28, 3), 2.5, dtype=np.float32) - 3, ValueError, r"dtype float32 holds values in \[-0.5, -0.5\]; expected \[0, 1\]"),
        (np.full((28, 28, 3), 300, dtype=np.int64), ValueError, r"dtype int64 holds values in \[300, 300\]; expected 0-255"),
        (np.full((28, 28, 3), np.nan, dtype=np.float32), ValueError, "dtype float32 holds NaN or infinite values"),
    ],
)
def test_unusable_pixel_types_are_refused_by_name(processor, image, error, message: str) -> None:
    with pytest.raises(error, match=message):
        pixels(processor, image)


def test_paths_and_bytes_keep_alpha_and_exif_orientation_like_pil_inputs(processor, tmp_path: Path) -> None:
    rgba = random_image(56, 28, seed=4, mode="RGBA")
    rgba.save(tmp_path / "alpha.png")
    reference = pixels(processor, rgba)  # transparency over white
    assert not torch.equal(reference, pixels(processor, rgba.convert("RGB")))  # dropping alpha would differ
    for source in (tmp_path / "alpha.png", str(tmp_path / "alpha.png"), (tmp_path / "alpha.png").read_bytes()):
        torch.testing.assert_close(pixels(processor, source), reference, rtol=0, atol=0)
    rotated = random_image(56, 28, seed=5)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg"))
    assert upright.size == (28, 56)
    torch.testing.assert_close(pixels(processor, tmp_path / "rotated.jpg"), pixels(processor, upright), rtol=0, atol=0)


def test_an_undecodable_file_leaves_no_handle_open(processor, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    random_image(64, 64).save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:100])
    (tmp_path / "text.png").write_bytes(b"not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("truncated.png", "text.png"):
            with pytest.raises(ValueError, match="cannot be decoded"):
                pixels(processor, str(tmp_path / name))
        gc.collect()
    assert not [warning for warning in caught if issubclass(warning.category, ResourceWarning)]


def test_the_trainer_collator_decodes_images_as_the_processor_does(processor, tmp_path: Path) -> None:
    """Training sees the pixels inference sees: transparency over white, for paths, bytes and PIL images."""
    from phantom_hf.trainer import PhantomPOCollator

    rgba = random_image(28, 28, seed=6, mode="RGBA")
    rgba.save(tmp_path / "alpha.png")
    reference = pixels(processor, rgba)
    collator = PhantomPOCollator(processor, apply_chat_template=False)
    for ref in (str(tmp_path / "alpha.png"), {"bytes": (tmp_path / "alpha.png").read_bytes(), "path": None}, rgba):
        batch = collator([{"images": [ref], "prompt": "<image> what", "chosen": "a cat", "rejected": "a dog"}])
        torch.testing.assert_close(batch["pixel_values"].to(reference.dtype), reference, rtol=0, atol=0)


def test_a_processor_built_without_a_chat_template_speaks_chatml() -> None:
    from phantom_hf.modeling.processing_phantom import (
        CHATML_CHAT_TEMPLATE,
        VICUNA_V1_CHAT_TEMPLATE,
        PhantomProcessor,
        build_fixed_size_image_processor,
        build_image_processor,
    )

    from .test_processor import make_tokenizer

    processor = PhantomProcessor(image_processor=build_image_processor(28, 1, 1), tokenizer=make_tokenizer(), image_seq_length=4)
    assert processor.chat_template == CHATML_CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>\nwhat is in the image ?<|im_end|><|im_start|>assistant\n"
    llava = PhantomProcessor(image_processor=build_fixed_size_image_processor("clip_vision_model", 28), tokenizer=make_tokenizer())
    assert llava.chat_template == VICUNA_V1_CHAT_TEMPLATE


RED = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225]  # pure red after ImageNet normalisation


@pytest.mark.parametrize("size", [(40, 3), (3, 40), (1, 1), (4, 1), (2, 2)])
def test_tiny_images_of_known_layout_are_never_reguessed(processor, tmp_path: Path, size: tuple[int, int]) -> None:
    """A few-pixel image given as PIL, file or bytes keeps its colour, and a square one stays one tile."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.save(tmp_path / "red.png")
    expected = torch.tensor(RED).view(1, 3, 1, 1)
    for source in (image, image.convert("RGBA"), tmp_path / "red.png", (tmp_path / "red.png").read_bytes()):
        out = processor(images=source, text="<image>", return_tensors="pt")
        torch.testing.assert_close(out["pixel_values"], expected.expand_as(out["pixel_values"]), rtol=0, atol=1e-5)
        if size[0] == size[1]:
            assert out["num_patches"].tolist() == [1]


@pytest.mark.parametrize("shape", [(3, 40, 3), (1, 1, 3), (4, 8, 1), (3, 3, 3)])
def test_raw_arrays_whose_channel_axis_is_ambiguous_are_refused(processor, shape: tuple[int, ...]) -> None:
    for image in (np.zeros(shape, dtype=np.uint8), torch.zeros(shape)):
        with pytest.raises(ValueError, match=rf"image 0 .*of shape \({shape[0]}, {shape[1]}, {shape[2]}\) may be \(H, W, C\) or \(C, H, W\)"):
            pixels(processor, image)


def test_raw_arrays_of_one_possible_layout_give_the_pixels_of_the_pil_image(processor) -> None:
    rgb = np.array(random_image(5, 40, seed=6))  # (40, 5, 3): only the last axis can hold channels
    reference = pixels(processor, Image.fromarray(rgb))
    torch.testing.assert_close(pixels(processor, rgb), reference, rtol=0, atol=0)
    torch.testing.assert_close(pixels(processor, torch.from_numpy(rgb).permute(2, 0, 1)), reference, rtol=0, atol=0)
    gray = np.asarray(random_image(3, 4, seed=7, mode="L"))  # (H, W) is grayscale, whatever its size
    torch.testing.assert_close(pixels(processor, gray), pixels(processor, Image.fromarray(gray)), rtol=0, atol=0)


def test_url_images_go_through_the_same_decoder_as_paths_and_bytes(processor, tmp_path: Path, monkeypatch) -> None:
    """An RGBA PNG served over http (127.0.0.1, a server stopped when the test ends) keeps its alpha, laid over white,
    as the same file given as a path or bytes; a missing URL is a ValueError naming it."""
    import http.server
    import threading

    rgba = random_image(56, 28, seed=8, mode="RGBA")
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    body = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/alpha.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(body) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        torch.testing.assert_close(pixels(processor, f"{url}/alpha.png"), pixels(processor, body), rtol=0, atol=0)
        torch.testing.assert_close(pixels(processor, f"{url}/alpha.png"), pixels(processor, rgba), rtol=0, atol=0)
        with pytest.raises(ValueError, match=f"image 0 \\({url}/missing.png\\) cannot be fetched: HTTP Error 404"):
            pixels(processor, f"{url}/missing.png")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
