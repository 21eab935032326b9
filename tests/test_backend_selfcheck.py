"""A backend is checked against math on the device before it is used; a wrong or crashing one is
replaced by the next of the policy, with one line naming it, the error and the fallback."""
from dataclasses import replace

import pytest
import torch

from model import GPT, GPTConfig, backends
from model.attention import Attention
from model.backends import selfcheck
from model.backends.sdpa import sdpa_attention


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(selfcheck, "_verdicts", {})


def tiny(**kw):
    return GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=50, block_size=32, **kw)


def backend_names(model):
    return {m.backend for m in model.modules() if isinstance(m, Attention)}


def break_sdpa(monkeypatch, attend):
    monkeypatch.setitem(backends.REGISTRY, "sdpa", replace(backends.get("sdpa"), attend=attend))


def test_correct_backend_is_trusted_once_and_its_cost_printed(capsys, monkeypatch):
    calls = []
    real = selfcheck.compare_with_math
    monkeypatch.setattr(selfcheck, "compare_with_math", lambda *a: calls.append(a[0].name) or real(*a))
    model = GPT(tiny())
    model.float()  # a move resolves again: the verdict is cached, not recomputed
    GPT(tiny())
    assert backend_names(model) == {"sdpa"}
    assert calls == ["sdpa"]
    err = capsys.readouterr().err
    assert err.count("attention backend sdpa (softmax, fp32, cpu) checked against math (forward and backward)") == 1
    assert " ms" in err


def test_wrong_backend_is_replaced_by_the_next_and_named(capsys, monkeypatch):
    break_sdpa(monkeypatch, lambda q, k, v, cfg, causal, sink=None: 1.1 * sdpa_attention(q, k, v, cfg, causal, sink))
    torch.manual_seed(0)
    model = GPT(tiny())
    assert backend_names(model) == {"math"}
    lines = [line for line in capsys.readouterr().err.splitlines() if "sdpa" in line]
    assert len(lines) == 1
    assert "attention backend sdpa (softmax, fp32, cpu) disagrees with math" in lines[0]
    assert lines[0].endswith("; using math")
    # It computes math's attention: the same logits as a model pinned to math.
    ref = GPT(tiny(backend="math"))
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(model(idx).logits, ref(idx).logits, rtol=0, atol=0)


def test_crashing_backend_is_replaced_with_its_error(capsys, monkeypatch):
    def crash(q, k, v, cfg, causal, sink=None):
        raise RuntimeError("illegal memory access")

    break_sdpa(monkeypatch, crash)
    assert backend_names(GPT(tiny())) == {"math"}
    err = capsys.readouterr().err
    assert "attention backend sdpa (softmax, fp32, cpu) failed its check against math: RuntimeError: illegal memory access; using math" in err


def test_named_backend_that_disagrees_falls_back_to_the_policy(capsys, monkeypatch):
    break_sdpa(monkeypatch, lambda q, k, v, cfg, causal, sink=None: sdpa_attention(q, k, v, cfg, causal, sink) + 1e-2)
    assert backends.resolve(tiny(backend="sdpa"), torch.device("cpu"), torch.float32) == "math"
    assert "; using math" in capsys.readouterr().err


def test_backward_is_checked_where_the_backend_trains(monkeypatch):
    """A kernel with a right forward and a wrong gradient is caught too."""
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    break_sdpa(monkeypatch, lambda q, k, v, cfg, causal, sink=None: WrongGrad.apply(sdpa_attention(q, k, v, cfg, causal, sink)))
    verdict, fresh = selfcheck.verdict(backends.get("sdpa"), tiny(), torch.device("cpu"), torch.float32)
    assert fresh and not verdict.trusted and "forward and backward" in verdict.line


def test_check_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    selfcheck.verdict(backends.get("sdpa"), tiny(), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(torch.rand(3), expected)


def test_devices_not_in_this_process_are_not_checked():
    """The policy is asked about CUDA on a CPU machine (tests, planning): nothing runs there."""
    failures = []
    assert selfcheck.trusted(backends.get("sdpa"), tiny(), torch.device("cuda"), torch.bfloat16, failures)
    assert failures == [] and selfcheck._verdicts == {}


def test_check_runs_under_no_grad_and_inference_mode():
    with torch.inference_mode():
        model = GPT(tiny())
    assert backend_names(model) == {"sdpa"}
