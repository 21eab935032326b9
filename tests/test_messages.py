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


IGNORED = {  # an override the variant never reads -> the words of its refusal
    "softmax with sigmoid_bias": (["model.sigmoid_bias=0.0"], "model.sigmoid_bias=0.0 applies to attention=sigmoid only"),
    "no rope scaling with a factor": (["model.rope_scaling_factor=4"], "rope_scaling_factor=4.0 applies to rope_scaling"),
    "linear scaling with a llama3 field": (["model.rope_scaling=linear", "model.rope_scaling_factor=2",
                                           "model.rope_original_context=64"], "rope_original_context=64 applies to rope_scaling=llama3"),
    "cosine with decay_fraction": (["train.decay_fraction=0.5"], "train.decay_fraction=0.5 applies to lr_schedule=wsd only"),
}


@pytest.mark.parametrize("case", list(IGNORED))
def test_settings_the_variant_ignores_are_refused(case):
    from configs import ConfigError, load_config
    from tests.conftest import ROOT

    overrides, words = IGNORED[case]
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_config(ROOT / "configs" / "default.yaml", overrides)


def test_defaults_and_every_shipped_config_still_load():
    """The refusal is only for values away from the default: a saved config.yaml lists every field."""
    import yaml

    from configs import from_dict, load_config, to_dict
    from tests.conftest import ROOT

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        text = yaml.safe_load(path.read_text())
        if isinstance(text, dict) and ("model" in text or "train" in text):
            cfg = load_config(path)
            assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg), path  # as a run's config.yaml reloads
    for overrides in (["model.attention=sigmoid", "model.sigmoid_bias=0.0"], ["train.lr_schedule=wsd", "train.decay_fraction=0.5"],
                      ["model.rope_scaling=llama3", "model.rope_scaling_factor=8", "model.rope_original_context=64"]):
        load_config(ROOT / "configs" / "default.yaml", overrides)


def test_lr_scale_part_matching_no_parameter_is_refused(tmp_path, tiny_run_args, capsys):
    import train

    code = train.main([*tiny_run_args(1), f"out_dir={tmp_path / 'out'}", "train.lr_scale=sink=10"])
    err = capsys.readouterr().err
    assert code == 2 and "train.lr_scale part 'sink' matches no trained parameter" in err
    assert [line for line in err.splitlines() if line.startswith("error:")] and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused in set-up: the run dir it made is gone
    assert train.main([*tiny_run_args(1), f"out_dir={tmp_path / 'out'}", "train.lr_scale=q_proj=10"]) == 0
