"""Concurrent readers and writers of one run: two writers of one file, an eval of a run whose
trainer prunes the checkpoint the eval just resolved."""
from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from util import write_atomic

TEXTS = [f"{w}\n" * 2000 for w in ("alpha", "beta")]  # 12 kB each: each write takes a while


def _write_many(path: str, text: str, n: int) -> None:
    for _ in range(n):
        write_atomic(Path(path), text)


def _check_whole(path: Path) -> None:
    assert path.read_text() in TEXTS  # the last rename's file, whole
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_two_threads_writing_one_file_never_fail(tmp_path):
    path = tmp_path / "result.json"
    errors = []

    def run(text):
        try:
            _write_many(str(path), text, 200)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in TEXTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _check_whole(path)


def test_two_processes_writing_one_file_never_fail(tmp_path):
    path = tmp_path / "metrics.json"
    ctx = multiprocessing.get_context("fork")  # plain file writes: no re-import of the test module per process
    procs = [ctx.Process(target=_write_many, args=(str(path), t, 200)) for t in TEXTS]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    _check_whole(path)


def test_written_file_has_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("pruned", ["whole", "half"])
def test_eval_of_a_run_dir_follows_a_checkpoint_pruned_mid_load(tmp_path, tiny_run_args, monkeypatch, capsys, pruned):
    """The trainer (train.keep_last=1) saves step 3 and prunes step 2 right after the eval resolved the
    run dir to step 2 (whole, or half-way: rmtree removes file by file, here tokenizer.json first): the
    eval loads step 3 instead and records it, instead of a missing-file error."""
    import json
    import os
    import shutil

    import model.weights
    import runs.load
    import train
    from eval import activations
    from trainer.checkpoint import point_latest, prune

    os.environ["WANDB_MODE"] = "disabled"
    assert train.main([*tiny_run_args(2), f"out_dir={tmp_path}", "name=live"]) == 0
    ckpts = tmp_path / "live" / "checkpoints"
    real_load = model.weights.load_weights
    saved = []

    def trainer_saves_then_load(model_, path):
        if not saved:  # what save_checkpoint does between two reads of the eval
            shutil.copytree(ckpts / "step_0000002", ckpts / ".tmp_step_0000003")
            os.replace(ckpts / ".tmp_step_0000003", ckpts / "step_0000003")
            point_latest(ckpts, "step_0000003")
            if pruned == "whole":
                saved.extend(prune(ckpts, keep_last=1))
            else:
                (ckpts / "step_0000002" / "tokenizer.json").unlink()
                saved.extend([ckpts / "step_0000001", ckpts / "step_0000002"])
        real_load(model_, path)

    monkeypatch.setattr(runs.load, "load_weights", trainer_saves_then_load)
    activations.main(["--ckpt", str(tmp_path / "live"), "--n-seqs", "2"])
    assert [p.name for p in saved] == ["step_0000001", "step_0000002"]
    result = json.loads((tmp_path / "live" / "eval" / "activations.json").read_text())
    assert result["checkpoint"]["path"].endswith("step_0000003") and result["checkpoint"]["step"] == 2


def test_a_named_checkpoint_pruned_mid_load_is_one_line(tmp_path, tiny_run_args, monkeypatch, capsys):
    """A checkpoint dir names one checkpoint: never swapped for another, one line that says so."""
    import os
    import shutil

    import pytest

    import runs.load
    import train
    from eval import activations

    os.environ["WANDB_MODE"] = "disabled"
    assert train.main([*tiny_run_args(1), f"out_dir={tmp_path}", "name=one"]) == 0
    step = tmp_path / "one" / "checkpoints" / "step_0000001"

    def pruned(model_, path):
        shutil.rmtree(step)
        raise FileNotFoundError(path)

    monkeypatch.setattr(runs.load, "load_weights", pruned)
    with pytest.raises(SystemExit) as e:
        activations.main(["--ckpt", str(step), "--n-seqs", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "step_0000001 disappeared before the eval could read it" in err
    assert "never pruned" not in err and len(err.strip().splitlines()) == 1
