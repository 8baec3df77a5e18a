"""The offline demo end to end, at the test suite's reduced budget."""

from __future__ import annotations

from pathlib import Path

import yaml

from phantom_hf.demo import run_demo


def test_quick_demo_learns_saves_reloads_and_answers(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", seed=0, budget="quick", show=3)
    assert result.accuracy_before < 0.1  # a random model does not write the answers
    # chance is 1/4 (colour, position) or 1/3 (shape, count): the trained model must be clearly above it
    assert result.accuracy_by_kind["count"] >= 0.9
    assert result.accuracy_after >= 0.4
    # the folder reloaded as remote code answers exactly as the model that was saved
    assert result.reloaded_accuracy == result.accuracy_after
    assert len(result.pipeline_answers) == 3
    folder = Path(result.folder)
    assert {"config.json", "model.safetensors", "processor_config.json", "modeling_phantom.py", "README.md"} <= {
        path.name for path in folder.iterdir()
    }
    card = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["pipeline_tag"] == "image-text-to-text" and front_matter["library_name"] == "transformers"
    assert f"{result.accuracy_after:.1%}" in card
