"""The transformers-release bridge (modeling/compat_phantom.py): the branch the installed release takes, both
cache keywords, no deprecation warnings from our code paths, and folders saved on one release loading on another.

CI runs this file on the newest releases and on the floors (.ci/run), so each branch of compat_phantom runs in
one pass or the other; `PHANTOM_HF_OTHER_PYTHON` names the other pass's interpreter for the cross-release test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.processing_utils import ProcessorMixin

from phantom_hf import PhantomCache
from phantom_hf.modeling import compat_phantom
from phantom_hf.modeling.compat_phantom import CACHE_NAME, cache_kwargs, cache_of

from .conftest import IMAGE_TOKEN_ID, left_padded_batch, make_model

INSTALLED = Version(transformers.__version__).release


def test_each_bridge_takes_the_branch_of_the_installed_release() -> None:
    assert CACHE_NAME == ("cache" if INSTALLED >= (5, 24) else "past_key_values")
    assert CACHE_NAME in CausalLMOutputWithPast.__dataclass_fields__
    assert compat_phantom.ASSISTANT_MASK_FOLLOWS_EXPANSION == (INSTALLED >= (5, 23))
    assert compat_phantom.ASSISTANT_MASK_FOLLOWS_EXPANSION == hasattr(ProcessorMixin, "_adjust_assistant_masks_indices")
    if compat_phantom._MARKED_RE is None:
        assert compat_phantom.unmarked("a <image> b") == "a <image> b"
    else:  # 5.23+: the user-text spans sanitize_control_tokens marked are dropped, the rest kept
        from transformers.processing_utils import _CONTROL_TOKEN_END, _CONTROL_TOKEN_START

        text = f"a {_CONTROL_TOKEN_START}<image>{_CONTROL_TOKEN_END} b <image>"
        assert compat_phantom.unmarked(text) == "a  b <image>"


def test_both_cache_keywords_give_the_same_decode_step() -> None:
    model = make_model(seed=3)
    input_ids, attention_mask = left_padded_batch([9, 6], seed=4)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1]
        steps = {}
        for name in ("cache", "past_key_values"):
            prefill = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], use_cache=True)
            cache = cache_of(prefill)
            assert isinstance(cache, PhantomCache) and cache.get_seq_length() == input_ids.shape[1] - 1
            step = model(input_ids=input_ids[:, -1:], attention_mask=attention_mask, **{name: cache})
            assert cache_of(step) is cache
            steps[name] = step.logits[:, -1]
    torch.testing.assert_close(steps["cache"], full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(steps["past_key_values"], steps["cache"], rtol=0, atol=0)
    other = PhantomCache(config=model.config.text_config)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=input_ids, attention_mask=attention_mask, cache=PhantomCache(config=model.config.text_config), past_key_values=other)


# Our code paths on the installed release, in a fresh process (transformers warns once per process), with every
# FutureWarning/DeprecationWarning raised as an error and transformers' log searched for deprecation notices.
OWN_PATHS = r"""
import logging, sys, tempfile, warnings
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
import phantom_hf
from phantom_hf import PhantomForConditionalGeneration, PhantomPOConfig
from phantom_hf.modeling.processing_phantom import PhantomProcessor
from phantom_hf.tiny import tiny_phantom_config
from phantom_hf.tokenization import build_tokenizer
from PIL import Image

records = []
class Collect(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("transformers").addHandler(Collect())
warnings.simplefilter("error", FutureWarning)
warnings.simplefilter("error", DeprecationWarning)

tokenizer = build_tokenizer([f"w{i}" for i in range(40)] + ["what", "is", "this", "?"])
config = tiny_phantom_config(image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                             text_config={"vocab_size": len(tokenizer)}, phantom_eta=1.0)
model = PhantomForConditionalGeneration(config).eval()
model.generation_config.pad_token_id = tokenizer.pad_token_id
processor = PhantomProcessor.from_config(config, tokenizer)
chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}]
prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
inputs = processor(images=[Image.new("RGB", (40, 30), "red")], text=[prompt], return_tensors="pt")
with torch.no_grad():
    out = model(**inputs, use_cache=True)
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2)
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    AutoModelForImageTextToText.from_pretrained(folder)
    AutoProcessor.from_pretrained(folder)
    PhantomPOConfig(output_dir=folder, training_stage=1)
notices = [message for message in records if "deprecat" in message.lower()]
assert not notices, notices
print("clean")
"""


def test_no_deprecation_warnings_from_our_code_paths(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", OWN_PATHS], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("clean"), result.stderr[-3000:]


# Loads a folder with the Auto classes and remote code only (never imports phantom_hf), in another interpreter.
REMOTE_LOGITS = r"""
import json, sys, torch, transformers
from transformers import AutoModelForImageTextToText
folder, inputs_path, out_path = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float64).eval()
with torch.no_grad():
    logits = model(**torch.load(inputs_path)).logits
json.dump({"version": transformers.__version__, "logits": logits.tolist(),
           "phantom_hf_imported": any(name.startswith("phantom_hf") for name in sys.modules)}, open(out_path, "w"))
"""


def test_folder_saved_here_loads_on_the_other_release(tmp_path: Path) -> None:
    """Saved on the running release, loaded in a fresh process of `PHANTOM_HF_OTHER_PYTHON` (the other CI pass's
    interpreter: newest <-> floor), or of this interpreter when unset: same logits, remote code only."""
    other = os.environ.get("PHANTOM_HF_OTHER_PYTHON", sys.executable)
    model = make_model(seed=11)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    input_ids, attention_mask = left_padded_batch([12, 9], seed=12)
    input_ids[0, 3:7] = IMAGE_TOKEN_ID
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": torch.randn(1, 3, 28, 28, dtype=torch.float64)}
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [other, "-c", REMOTE_LOGITS, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.json")],
        check=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    result = json.loads((tmp_path / "out.json").read_text())
    print(f"saved with transformers {transformers.__version__}, loaded with {result['version']}")
    assert result["phantom_hf_imported"] is False
    torch.testing.assert_close(torch.tensor(result["logits"], dtype=torch.float64), expected, rtol=1e-10, atol=1e-10)
