"""The hand-written backwards that keep the CPU step at nanoGPT's speed (model/norm.py, model/rope.py):
forwards bit for bit as the modules they replace, gradients as autograd's (gradcheck in float64), and the
fallbacks where the composite stays."""
from __future__ import annotations

import torch
import torch.nn as nn

from model.norm import RMSNorm, _RMSNormFunction
from model.rope import _rotate, apply_rope, rope_cos_sin, rope_frequencies


def test_rmsnorm_forward_is_nn_rmsnorm_bit_for_bit_and_gradients_agree():
    torch.manual_seed(0)
    ours, ref = RMSNorm(32, eps=1e-5), nn.RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 7, 32, requires_grad=True)
    y, y_ref = ours(x), ref(x)
    assert y.grad_fn.name() == "_RMSNormFunctionBackward"  # the hand-written path ran
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, ours.weight), g)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, ref.weight), g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)


def test_rmsnorm_gradcheck_float64():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, w))


def test_rmsnorm_falls_back_without_grad_and_below_fp32():
    norm = RMSNorm(16, eps=1e-6)
    x = torch.randn(2, 16, requires_grad=True)
    with torch.no_grad():
        assert norm(x).grad_fn is None
    y = norm.bfloat16()(x.detach().bfloat16().requires_grad_())
    assert y.grad_fn.name() != "_RMSNormFunctionBackward"  # torch's composite upcasts to fp32 there


def test_rope_backward_is_the_transposed_rotation():
    torch.manual_seed(2)
    cos, sin = rope_cos_sin(torch.arange(6), rope_frequencies(8, 10000.0), torch.float64)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    assert apply_rope(x, cos, sin).grad_fn.name() == "_RotateBackward"
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos, sin), (x,))
    # forward values are the plain rotation's, and the rotation is orthogonal: R^T R x = x
    assert torch.equal(apply_rope(x, cos, sin), _rotate(x, cos, sin))
    torch.testing.assert_close(_rotate(_rotate(x, cos, sin), cos, sin, sign=-1), x)
