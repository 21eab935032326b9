"""Messages that say what is true: a refusal names the actual problem, not a neighbouring one."""
from __future__ import annotations

import json

import pytest

from runs.load import load_run
from tests.test_hf_vit import save_tiny_vit
from tests.hf_models import save_tiny

pytestmark = pytest.mark.usefixtures("single_thread")


def test_vit_folder_without_config_json_is_not_called_a_language_model(tmp_path):
    folder = tmp_path / "dinov2"
    save_tiny_vit("dinov2", folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError) as e:
        load_run(f"hf:{folder}", task="vit")
    assert "config.json is missing" in str(e.value) and "language model" not in str(e.value)


def test_decoder_folder_for_a_vit_eval_names_its_model_type(tmp_path):
    folder = tmp_path / "llama"
    save_tiny("llama", folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    with pytest.raises(ValueError, match=r"is a pretrained language model \(model_type 'llama'\), not a vit model"):
        load_run(f"hf:{folder}", task="vit")
