"""fixes/calibrate_sink.py: the fitted slot against a hand computation from the reference decoder, and the
CLI end to end on a tiny GGUF import: the run it writes loads in every eval, sample.py and train.init_from
with the calibrated function, existing runs and models without a sink are refused before any work."""
from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from gguf_models import save_tiny_gguf

import train
from fixes import calibrate_sink
from fixes.calibrate_sink import OFF, first_key_stats, fit_slots, with_slots
from model import GPT, GPTConfig
from runs.load import load_run

WORDS = "the quick brown fox jumps over a lazy dog and cat sat on mat while bird sings of night day sun moon".split()


def hand_stats(ref, model, windows):
    """s_i0, A_i0 and v_0 per layer from conftest's reference decoder, in fp64."""
    cfg, sd = model.config, {k: v.double() for k, v in model.state_dict().items()}
    _, hidden, weights, _ = ref.gpt(windows, sd, cfg)
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    N, T = windows.shape
    pos = torch.arange(T)
    out = []
    for i in range(cfg.n_layer):
        x = sd["embed_tokens.weight"][windows] if i == 0 else hidden[i - 1]
        h = ref.rms(x, sd[f"layers.{i}.input_layernorm.weight"], cfg.norm_eps)
        q = ref.rope((h @ sd[f"layers.{i}.self_attn.q_proj.weight"].T).view(N, T, H, D), pos, cfg.rope_theta)
        k = ref.rope((h @ sd[f"layers.{i}.self_attn.k_proj.weight"].T).view(N, T, Hkv, D), pos, cfg.rope_theta)
        v = (h @ sd[f"layers.{i}.self_attn.v_proj.weight"].T).view(N, T, Hkv, D)
        group = [hh // (H // Hkv) for hh in range(H)]
        s = torch.stack([(q[:, 1:, hh] * k[:, :1, group[hh]]).sum(-1) / math.sqrt(D) for hh in range(H)], dim=1)
        out.append({"score": s, "weight": weights[i][:, :, 1:, 0], "value": v[:, 0]})
    return out


def test_fitted_slot_equals_a_hand_computation(ref):
    cfg = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=50)
    model = ref.randomize_(GPT(cfg), seed=4).double().eval()
    windows = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    stats, hand = first_key_stats(model, windows), hand_stats(ref, model, windows)
    for got, want in zip(stats, hand):
        for key in ("score", "weight", "value"):
            ref.close(got[key].double(), want[key], 1e-5, key)
    key0 = [st["weight"].mean().item() for st in hand]
    threshold = (key0[0] + key0[1]) / 2  # one layer above, one below
    fitted = fit_slots(stats, "lme", "mean", "sink", threshold)
    for f, st, w in zip(fitted, hand, key0):
        assert f["on"] == (w >= threshold)
        if f["on"]:
            s = st["score"].transpose(0, 1).reshape(cfg.n_head, -1)
            ref.close(f["logit"].double(), torch.log(torch.exp(s).mean(1)), 1e-5, "log-mean-exp logit")
            ref.close(f["value"].double(), st["value"].mean(0), 1e-5, "mean first-token value")
        else:
            assert (f["logit"] == OFF).all() and not f["value"].any()
    per_head = fit_slots(stats, "lme", "mean", "heads", threshold)
    for f, st in zip(per_head, hand):
        sink_heads = st["weight"].mean(dim=(0, 2)) >= threshold
        assert f["heads"] == sink_heads.tolist() and f["on"] == bool(sink_heads.any())
        assert ((f["logit"] == OFF) == ~sink_heads).all()
    median = fit_slots(stats, "median", "none", "all")
    for f, st in zip(median, hand):
        ref.close(f["logit"].double(), st["score"].transpose(0, 1).reshape(cfg.n_head, -1).median(1).values, 1e-5,
                  "median logit")
        assert not f["value"].any()
    # The calibrated copy: a layer without a slot computes exactly what it did; the original is untouched.
    calibrated = with_slots(model, fit_slots(stats, "lme", "mean", "sink", 2.0 * max(key0)))  # no layer gets one
    with torch.no_grad():
        assert torch.equal(calibrated(windows).logits, model(windows).logits)
    assert model.config.sink_logit == "none" and not hasattr(model.layers[0].self_attn, "sinks")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for d in range(6):
        (root / "corpus" / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)) + "\n")
    return root, save_tiny_gguf("llama", root / "llama" / "tiny.gguf")


def cli(root, gguf, name, *extra):
    return ["--ckpt", f"hf:{gguf}", "--data", f"{root}/corpus", "--name", name, "--out-dir", f"{root}/out",
            "--windows", "2", "--length", "16", "--tokens", "60", "--caches", "12", *extra]


def test_cli_writes_a_run_every_reader_takes(tiny, capsys):
    root, gguf = tiny
    record = calibrate_sink.main(cli(root, gguf, "tts", "--layers", "all"))
    run_dir = root / "out" / "tts"
    assert (run_dir / "checkpoints" / "latest").is_symlink() and (run_dir / "calibration.json").is_file()
    assert (run_dir / "readout.png").stat().st_size > 1000
    saved = json.loads((run_dir / "calibration.json").read_text())
    assert saved["rule"] == {"logit": "lme", "value": "mean", "layers": "all", "min_weight": 0.3, "auto_candidates": []}
    assert all(layer["slot"] for layer in saved["layers"]) and saved["readout"]["rows"][0]["cache"] == 12
    assert record["layers"] == saved["layers"]

    # Loaded back: the calibrated function, equal to the slot fitted in memory on the same windows.
    original = load_run(f"hf:{gguf}", data=f"{root}/corpus")
    run = load_run(run_dir, data=f"{root}/corpus")
    assert run.model.config.sink_value and run.model.config.sink_logit == "learned"
    assert (run.val_tokens() == original.val_tokens()).all()  # the same held-out text, the import's EOS
    windows = calibrate_sink.calibration_windows(original.val_tokens(), 2, 16, None, 60)
    expected = with_slots(original.model, fit_slots(first_key_stats(original.model, windows), layers="all"))
    tokens = torch.from_numpy(original.val_tokens()[:20].astype("int64"))[None]
    with torch.no_grad():
        assert torch.allclose(run.model(tokens).logits, expected(tokens).logits, atol=1e-6)
        assert (run.model(tokens).logits - original.model(tokens).logits).abs().max() > 1e-4

    # An eval and sample.py read it; train.init_from starts from exactly that model.
    from eval import streaming

    capsys.readouterr()
    streaming.main(["--ckpt", str(run_dir), "--data", f"{root}/corpus", "--tokens", "40", "--window", "8",
                    "--modes", "window"])
    import sample

    assert sample.main(["--ckpt", str(run_dir), "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0"]) in (0, None)
    os.environ["WANDB_MODE"] = "disabled"
    args = [f"train.init_from={run_dir}", f"data.source={root}/corpus", f"data.cache_dir={root}/cache",
            f"out_dir={root}/out", "name=trained_in", "model.block_size=16", "train.batch_size=2",
            "train.micro_batch_size=2", "train.warmup_steps=1", "train.eval_windows=2", "train.sink_interval=0",
            "train.train_only=sink", "train.lr=1e-2", "train.max_steps=2", "train.ckpt_interval=2",
            "logging.progress=false"]
    assert train.main(args) == 0
    trained = dict(load_run(root / "out" / "trained_in").model.named_parameters())
    start = dict(run.model.named_parameters())
    assert torch.equal(trained["layers.0.self_attn.q_proj.weight"], start["layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(trained["layers.0.self_attn.sink_values"], start["layers.0.self_attn.sink_values"])


def test_auto_keeps_the_candidate_with_the_lowest_key0_free_loss(ref, tiny):
    root, gguf = tiny
    run = load_run(f"hf:{gguf}", data=f"{root}/corpus")
    windows = calibrate_sink.calibration_windows(run.val_tokens(), 2, 16, None, 60)
    stats = first_key_stats(run.model, windows)
    fitted, rows = calibrate_sink.choose_slots(run.model, stats, windows)
    assert [(r["layers"], r["min_weight"]) for r in rows] == list(calibrate_sink.AUTO_CANDIDATES)
    best = min(rows, key=lambda r: r["key0_free_nll"])
    expected = fit_slots(stats, "lme", "mean", best["layers"], best["min_weight"])
    assert all(torch.equal(f["logit"], e["logit"]) for f, e in zip(fitted, expected))
    # each candidate's loss is the model's own NLL with key 0 masked for queries >= 1 (the reference decoder)
    cal = with_slots(run.model, expected).double()
    sd = {k: v.double() for k, v in cal.state_dict().items()}
    logits = ref.gpt(windows[:, :-1], sd, cal.config, drop_key0_layers=range(cal.config.n_layer), drop_from=1)[0]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
    assert abs(nll - best["key0_free_nll"]) < 1e-4


def test_refusals_write_nothing(tiny, capsys):
    root, gguf = tiny
    (root / "out" / "keep").mkdir(parents=True)
    (root / "out" / "keep" / "mine.txt").write_text("a run")
    for argv, message in [
        (cli(root, gguf, "keep"), "exists; choose another --name"),
        (cli(root, gguf, "../escape"), "must be one plain name"),
        (cli(root, gguf, "nosink", "--min-weight", "0.99"), "has no first-token sink"),
        (cli(root, gguf, "short", "--tokens", "100000"), "do not fit"),
    ]:
        with pytest.raises(SystemExit) as e:
            calibrate_sink.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert (root / "out" / "keep" / "mine.txt").read_text() == "a run"
    assert not (root / "out" / "nosink").exists() and not (root / "escape").exists()
    assert not [p for p in (root / "out").iterdir() if p.name.startswith(".")]  # no temp dir left behind
