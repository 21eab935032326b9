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


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_run_args):
    import os

    import train

    out = tmp_path_factory.mktemp("lm")
    os.environ["WANDB_MODE"] = "disabled"
    assert train.main([*tiny_run_args(3), f"out_dir={out}", "name=lm"]) == 0
    return out / "lm"


def test_streaming_keeps_finished_modes_on_ctrl_c(lm_run, monkeypatch, capsys):
    """Ctrl-C during the second mode: the first is printed, saved (marked partial) and equal to a full run's."""
    from eval import streaming

    argv = ["--ckpt", str(lm_run), "--tokens", "300", "--n-sink", "2", "--window", "12", "--modes", "window", "sinks"]
    real, calls = streaming.stream_nll, []

    def interrupted_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(streaming, "stream_nll", interrupted_second)
    with pytest.raises(SystemExit) as e:
        streaming.main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 130 and "window [0+14, parallel]: ppl" in out and "Traceback" not in err
    partial = json.loads((lm_run / "eval" / "streaming.partial.json").read_text())
    assert partial["partial"] == {"modes_done": ["window"], "modes_asked": ["window", "sinks"]}
    assert partial["checkpoint"]["step"] == 3 and partial["flags"]["window"] == 12
    assert not (lm_run / "eval" / "streaming.json").exists()
    monkeypatch.setattr(streaming, "stream_nll", real)
    (full,) = streaming.main(argv)
    assert full.modes["window"]["ppl"] == pytest.approx(partial["modes"]["window"]["ppl"], rel=1e-6)
    assert not (lm_run / "eval" / "streaming.partial.json").exists()  # replaced by the whole result


def test_streaming_default_recompute_is_strided(lm_run, capsys):
    from eval import streaming

    (r,) = streaming.main(["--ckpt", str(lm_run), "--tokens", "3000", "--n-sink", "2", "--window", "12",
                           "--modes", "recompute", "--tag", "auto"])
    assert r.recompute_stride == streaming.auto_stride(2999, 15) == 3  # ~1000 windows past the first 15
    assert r.modes["recompute"]["n_scored"] == 15 + len(range(15, 2999, 3))
    assert "recompute scores one prediction in 3" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_parallel_and_exact_decode_agree_within_the_stated_dtype_tolerance(lm_run, dtype, capsys):
    from eval import streaming

    runs = {}
    for exact in (False, True):
        argv = ["--ckpt", str(lm_run), "--tokens", "400", "--n-sink", "2", "--window", "12", "--modes", "sinks",
                "--dtype", dtype, "--chunk", "64", "--tag", f"{dtype}-{exact}"] + (["--exact-decode"] if exact else [])
        (runs[exact],) = streaming.main(argv)
    assert "the parallel form is within" in capsys.readouterr().out
    tol = runs[False].parallel_tolerance_nats
    assert tol == {"fp32": 1e-5, "bf16": 5e-3}[dtype] and runs[False].dtype == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert abs(runs[False].modes["sinks"]["mean_nll"] - runs[True].modes["sinks"]["mean_nll"]) <= tol
    saved = json.loads((lm_run / "eval" / f"{dtype}-False" / "streaming.json").read_text())
    assert saved["parallel_tolerance_nats"] == tol and "bf16" in saved["definitions"]["parallel_tolerance_nats"]
