"""save_pretrained -> Auto classes with trust_remote_code in a process that never imports phantom_hf."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import infer_auto_device_map
from transformers import AutoModelForImageTextToText

from .conftest import IMAGE_TOKEN_ID, left_padded_batch, make_model, no_split_modules

REMOTE_LOAD = r"""
import json, sys, torch
from transformers import AutoModel, AutoModelForImageTextToText
folder, inputs_path, out_path = sys.argv[1:4]
inputs = torch.load(inputs_path)
results = {}
for auto_class in (AutoModel, AutoModelForImageTextToText):
    model = auto_class.from_pretrained(folder, trust_remote_code=True, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    results[auto_class.__name__] = {"module": type(model).__module__, "logits": logits.tolist()}
results["phantom_hf_imported"] = any(name.startswith("phantom_hf") for name in sys.modules)
json.dump(results, open(out_path, "w"))
"""


def test_saved_folder_loads_as_remote_code_without_phantom_hf(tmp_path: Path) -> None:
    model = make_model(seed=7)
    folder = tmp_path / "phantom-tiny"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_phantom.PhantomForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_phantom.PhantomConfig"
    assert {"modeling_phantom.py", "configuration_phantom.py", "cache_phantom.py", "model.safetensors"} <= {
        p.name for p in folder.iterdir()
    }

    input_ids, attention_mask = left_padded_batch([12, 9], seed=17)
    input_ids[0, 3:7] = IMAGE_TOKEN_ID
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(1, 3, 28, 28, dtype=torch.float64),
    }
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.json")],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["phantom_hf_imported"] is False
    for name in ("AutoModel", "AutoModelForImageTextToText"):
        assert results[name]["module"].startswith("transformers_modules")
        torch.testing.assert_close(torch.tensor(results[name]["logits"], dtype=torch.float64), expected)


def test_package_registers_auto_classes_and_loads_bf16(tmp_path: Path) -> None:
    model = make_model(seed=8, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    input_ids, attention_mask = left_padded_batch([10, 6], seed=18)
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=attention_mask).logits
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)  # registered: no trust_remote_code needed
    assert type(reloaded).__module__ == "phantom_hf.modeling.modeling_phantom"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits, reference)
    half = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = half(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    real = attention_mask.bool()
    assert (logits[real] - reference[real]).abs().max() < 0.05 * reference[real].abs().max()
    assert (logits[real].argmax(-1) == reference[real].argmax(-1)).float().mean() > 0.9


def test_device_map_auto_loads_on_cpu(tmp_path: Path) -> None:
    model = make_model(seed=9, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    input_ids, attention_mask = left_padded_batch([7, 7], seed=19)
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=attention_mask).logits
    mapped = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto")
    with torch.no_grad():
        torch.testing.assert_close(mapped(input_ids=input_ids, attention_mask=attention_mask).logits, reference)
    # under memory pressure accelerate places whole decoder/vision layers, never splitting one (Phantom
    # modules live inside the attention of a decoder layer)
    placement = infer_auto_device_map(
        mapped, max_memory={"cpu": 300_000, "disk": 10**9}, no_split_module_classes=list(no_split_modules(mapped))
    )
    assert {"cpu", "disk"} <= set(placement.values())
    assert not [name for name in placement if re.search(r"layers\.\d+\.", name)]
