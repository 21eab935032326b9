"""The trainer's pieces: LR schedules, trainer_state.json, and the sink rows and eval metrics a real
run writes."""
from __future__ import annotations

import json
import os

import pytest

import train
from configs import TrainConfig, load_config
from trainer.checkpoint import TrainerState
from trainer.optim import lr_at


# ------------------------------------------------------------------------------ LR schedules
def schedule(kind: str, **kw) -> TrainConfig:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100, lr_schedule=kind, **kw)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("kind", ["cosine", "constant", "wsd"])
def test_every_schedule_warms_up_linearly(kind):
    cfg = schedule(kind)
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_is_the_default_and_halves_at_mid_decay():
    assert TrainConfig().lr_schedule == "cosine"
    cfg = schedule("cosine")
    # progress = (step - 10) / 90: 0 at step 10, 1/2 at step 55, 1 at step 100
    assert [lr_at(s, cfg) for s in (10, 55, 100)] == pytest.approx([1.0, 0.55, 0.1])


def test_constant_stays_at_lr():
    cfg = schedule("constant")
    assert [lr_at(s, cfg) for s in (10, 50, 99)] == [1.0, 1.0, 1.0]


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    cfg = schedule("wsd")  # decay_fraction 0.2: decay over steps 80..100
    assert [lr_at(s, cfg) for s in (10, 50, 80)] == [1.0, 1.0, 1.0]
    assert [lr_at(s, cfg) for s in (85, 90, 100)] == pytest.approx([0.775, 0.55, 0.1])
    half = schedule("wsd", decay_fraction=0.5)  # decay over steps 50..100
    assert [lr_at(s, half) for s in (50, 75, 100)] == pytest.approx([1.0, 0.55, 0.1])


# ------------------------------------------------------------------------------ trainer_state.json
def test_trainer_state_round_trips_and_names_a_missing_counter(tmp_path):
    state = TrainerState(step=7, tokens=896, skipped_steps=2, world_size=2, lr_horizon=600,
                         data_fingerprint={"train_tokens": 5})
    state.write(tmp_path)
    assert TrainerState.read(tmp_path) == state
    # an older file (a bad_in_row counter, no horizon or fingerprint) still reads
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 7, "tokens": 9, "bad_in_row": 1,
                                                             "skipped_steps": 0}))
    assert TrainerState.read(tmp_path) == TrainerState(7, 9, 0)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 7, "bad_in_row": 0, "skipped_steps": 0}))
    with pytest.raises(ValueError, match="trainer_state.json lacks step/tokens/skipped_steps"):
        TrainerState.read(tmp_path)


# ------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def base(word_corpus) -> list[str]:
    os.environ["WANDB_MODE"] = "disabled"
    return [f"out_dir={word_corpus / 'out'}", f"data.cache_dir={word_corpus / 'cache'}",
            f"data.source={word_corpus / 'corpus'}", "data.vocab_size=300", "model.n_layer=1", "model.n_head=2",
            "model.n_embd=32", "model.block_size=32", "train.batch_size=2", "train.micro_batch_size=2",
            "train.warmup_steps=1", "train.eval_windows=4", "logging.progress=false"]


def rows(run, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("split") == split]


def test_sink_rows_follow_the_interval(base, word_corpus):
    assert train.main([*base, "name=every2", "train.max_steps=5", "train.eval_interval=100",
                       "train.sink_interval=2"]) == 0
    sink = rows(word_corpus / "out" / "every2", "sink")
    assert [r["step"] for r in sink] == [2, 4, 5]  # every 2 steps, and at the end like the eval
    for r in sink:
        assert {"sink_1", "f_attn", "max_h_ratio", "sink_time_s"} <= set(r)
        assert 0 <= r["sink_1"] <= 100 and 0 < r["f_attn"] < 1 and r["max_h_ratio"] >= 1 and r["sink_time_s"] > 0
    assert train.main([*base, "name=no_sinks", "train.max_steps=2", "train.sink_interval=0"]) == 0
    assert rows(word_corpus / "out" / "no_sinks", "sink") == []


def test_sink_interval_defaults_to_eval_and_evaluate_returns_the_logged_metrics(base, word_corpus):
    trainer = train.Trainer(load_config(None, [*base, "name=default_interval", "train.max_steps=4",
                                               "train.eval_interval=3"]))
    assert trainer.fit() == 0
    run = word_corpus / "out" / "default_interval"
    assert [r["step"] for r in rows(run, "sink")] == [3, 4]
    assert [r["step"] for r in rows(run, "val")] == [3, 4]
    last = rows(run, "val")[-1]
    assert trainer.evaluate() == {"val_loss": last["val_loss"]}  # the same fixed batches, all metrics in the dict


def test_the_validated_config_stays_as_given_and_the_run_records_what_it_resolved(base, word_corpus):
    """The micro batch that fits and the vocabulary the data decides are in the trainer's config and the
    run's config.yaml; the config the trainer was given is not written into."""
    import yaml

    from configs import to_dict

    cfg = load_config(None, [*base, "name=resolved", "train.max_steps=1", "train.batch_size=4",
                             "train.micro_batch_size=3"])
    assert cfg.model.vocab_size is None
    given = to_dict(cfg)
    trainer = train.Trainer(cfg)
    try:
        assert to_dict(cfg) == given
        vocab = json.loads((trainer.task.data_dir / "meta.json").read_text())["vocab_size"]
        assert trainer.cfg.model.vocab_size == vocab and trainer.cfg.train.micro_batch_size == 2  # 3 does not divide 4
        saved = yaml.safe_load((word_corpus / "out" / "resolved" / "config.yaml").read_text())
        assert saved["model"]["vocab_size"] == vocab and saved["train"]["micro_batch_size"] == 2
    finally:
        trainer.release_lock()
