"""lmms-eval's entry point for the `phantom` model (pyproject.toml, group `lmms_eval.models`).

lmms-eval reads its entry points while `lmms_eval.models` is being imported, so this module imports nothing of
lmms-eval at import time and names the model class by path: `phantom_hf.lmms_eval_phantom` is imported only when
a run asks for `--model phantom`.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "phantom"
MODEL_CLASS_PATH = "phantom_hf.lmms_eval_phantom.PhantomLMMS"


def manifest() -> Any:
    """The `ModelManifest` of the `phantom` model (a simple, i.e. text + images, lmms-eval model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)


__all__ = ["MODEL_CLASS_PATH", "MODEL_ID", "manifest"]
