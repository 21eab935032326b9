"""Evals never replace a differently configured result: each JSON records its flags, an eval whose
output holds other flags stops before any work naming --tag, and --tag writes under <eval dir>/<tag>/."""
from __future__ import annotations

import json

import pytest

from eval import spikes


@pytest.fixture
def run_dir(tmp_path):
    rows = [{"step": s, "loss": 3.0 + 0.01 * (s % 7)} for s in range(1, 301)]
    rows[250]["loss"] = 50.0
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_other_flags_never_replace_a_result(run_dir, capsys):
    spikes.main(["--run", str(run_dir), "--window", "50"])
    first = (run_dir / "eval" / "spikes.json").read_bytes()
    assert json.loads(first)["flags"] == {"k": 6.0, "two_sided": False, "window": 50}
    with pytest.raises(SystemExit) as e:
        spikes.main(["--run", str(run_dir), "--window", "100"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "window: 50 there, 100 now" in err and "--tag NAME" in err
    assert (run_dir / "eval" / "spikes.json").read_bytes() == first  # kept as it was
    spikes.main(["--run", str(run_dir), "--window", "100", "--tag", "w100"])
    tagged = json.loads((run_dir / "eval" / "w100" / "spikes.json").read_text())
    assert tagged["flags"]["window"] == 100 and (run_dir / "eval" / "w100" / "spikes.png").is_file()
    assert (run_dir / "eval" / "spikes.json").read_bytes() == first
    spikes.main(["--run", str(run_dir), "--window", "50"])  # the same flags again: replaced, as before
    assert json.loads((run_dir / "eval" / "spikes.json").read_text())["flags"]["window"] == 50


def test_tag_is_one_folder_name(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        spikes.main(["--run", str(run_dir), "--tag", "../escape"])
    assert e.value.code == 2 and "must be a folder name" in capsys.readouterr().err
    assert not (run_dir / "eval").exists()
