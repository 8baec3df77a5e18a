"""The four published Phantom sizes by name (paper Sec. 4).

The data lives in the remote-code file `modeling/presets_phantom.py` so that `PhantomConfig.from_preset` works in a
Hub folder too; this module is its public face in the library.
"""

from __future__ import annotations

from typing import Any

from .modeling import PhantomConfig
from .modeling.presets_phantom import PRESET_NAMES, PRESETS
from .modeling.processing_phantom import CHAT_FORMATS, chat_format_for


def get_preset_config(name: str, **overrides: Any) -> PhantomConfig:
    """`PhantomConfig` of preset `name` ("phantom-0.5b", "phantom-1.8b", "phantom-3.8b", "phantom-7b").

    Same as `PhantomConfig.from_preset(name, **overrides)`; an unknown name is a `ValueError` listing the known ones.
    """
    return PhantomConfig.from_preset(name, **overrides)


def list_presets() -> list[str]:
    """Names of the published sizes."""
    return list(PRESET_NAMES)


__all__ = ["CHAT_FORMATS", "PRESETS", "PRESET_NAMES", "chat_format_for", "get_preset_config", "list_presets"]
