"""``models.bnn.MaxPool2x2``: torch's ``nn.MaxPool2d(2)`` to every bit, with a faster forward pass without
autograd (four strided views; also under ``vmap`` alone) and torch's own kernel wherever a derivative may follow
(autograd, ``torch.func``'s derivative transforms, forward-mode AD) or the layer's settings were changed."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from mcmc_unlearner.models.bnn import MaxPool2x2, build_model, lenet5

SHAPES = [(3, 2, 8, 8), (2, 3, 7, 9), (5, 1, 2, 3), (4, 6, 28, 28)]  # odd sizes: the last row/column is dropped


@pytest.mark.parametrize("shape", SHAPES)
def test_values_equal_torchs_pooling_without_autograd(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x[..., ::3, ::2] = 0.0  # ties, as after a ReLU
    with torch.no_grad():
        assert torch.equal(MaxPool2x2()(x), F.max_pool2d(x, 2))
    with torch.inference_mode():
        assert torch.equal(MaxPool2x2()(x), F.max_pool2d(x, 2))
    unbatched = x[0]  # [C, H, W], as nn.MaxPool2d accepts
    with torch.no_grad():
        assert torch.equal(MaxPool2x2()(unbatched), F.max_pool2d(unbatched, 2))


def _counted(monkeypatch) -> list[bool]:
    """Calls of torch's kernel (``F.max_pool2d``), each recorded with whether autograd was on."""
    calls: list[bool] = []
    real = F.max_pool2d

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "max_pool2d", counted)
    return calls


def test_takes_the_strided_views_only_on_plain_tensors_without_autograd(monkeypatch):
    calls = _counted(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        MaxPool2x2()(x)
    assert calls == []  # torch's kernel is not called without autograd
    MaxPool2x2()(x.clone().requires_grad_())
    assert calls == [True]  # with autograd on, it is
    with torch.no_grad():  # and under torch.func's derivative transforms and forward-mode AD
        jvp(MaxPool2x2(), (x,), (x,))
        with fwAD.dual_level():
            MaxPool2x2()(fwAD.make_dual(x, x))
    assert calls == [True, False, False]
    with torch.no_grad():  # vmap alone batches plain values: the strided views (stop 59: the check's passes)
        ref = F.max_pool2d(x, 2).unsqueeze(0)
        assert torch.equal(vmap(MaxPool2x2())(x.unsqueeze(0)), ref)
        assert torch.equal(vmap(vmap(MaxPool2x2()))(x.unsqueeze(0).unsqueeze(0)), ref.unsqueeze(0))
    assert calls == [True, False, False, False]  # (the last: the reference's own call)
    with torch.no_grad():  # but a tangent or a derivative transform inside or outside vmap runs torch's kernel
        vmap(lambda u: jvp(MaxPool2x2(), (u,), (u,)))(x.unsqueeze(0))
        jvp(vmap(MaxPool2x2()), (x.unsqueeze(0),), (x.unsqueeze(0),))
        with fwAD.dual_level():
            vmap(MaxPool2x2())(fwAD.make_dual(x, x).unsqueeze(0))
    grad(lambda u: vmap(MaxPool2x2())(u).sum())(x.unsqueeze(0))
    assert calls == [True, False, False, False, False, False, False, True]


@pytest.mark.parametrize("arch,shape", [("lenet5", (1, 32, 32)), ("small_cnn", (3, 32, 32)), ("digits_net", (1, 8, 8))])
def test_networks_give_torchs_logits_and_gradients(arch, shape):
    torch.manual_seed(0)
    ours = build_model(arch, shape, 10)
    pools = [m for m in ours.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(type(m) is MaxPool2x2 for m in pools)
    theirs = build_model(arch, shape, 10)
    theirs.load_state_dict(ours.state_dict())
    for module in theirs.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, MaxPool2x2):
                setattr(module, name, nn.MaxPool2d(2))
    x, y = torch.rand(16, *shape), torch.randint(0, 10, (16,))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    grads = []
    for m in (ours, theirs):
        F.cross_entropy(m(x), y).backward()
        grads.append([p.grad for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_vmap_and_jvp_without_autograd_match_torchs_pooling():
    """The unlearner's check vmaps the model over draws and, below its difference threshold, takes forward-mode
    directional derivatives, both under ``torch.no_grad``: torch's kernel runs there, to every bit."""
    torch.manual_seed(1)
    ours, theirs = lenet5(), lenet5()
    theirs.load_state_dict(ours.state_dict())
    theirs.features[2], theirs.features[5] = nn.MaxPool2d(2), nn.MaxPool2d(2)
    x = torch.rand(8, 1, 32, 32)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    stacked = {k: torch.stack([v, v + 0.01 * torch.randn_like(v), v - 0.02]) for k, v in params.items()}
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    with torch.no_grad():
        v_ours = vmap(lambda p: functional_call(ours, p, (x,)))(stacked)
        v_theirs = vmap(lambda p: functional_call(theirs, p, (x,)))(stacked)
        assert torch.equal(v_ours, v_theirs)
        out_o, tan_o = jvp(lambda p: functional_call(ours, p, (x,)), (params,), (tangent,))
        out_t, tan_t = jvp(lambda p: functional_call(theirs, p, (x,)), (params,), (tangent,))
    assert torch.equal(out_o, out_t)
    assert torch.equal(tan_o, tan_t)  # torch's kernel: its tangent, to every bit


def test_tangents_at_ties_are_torchs():
    """Integer-valued inputs tie often; ``torch.maximum``'s forward-mode formula would round the tangents and
    average them at ties, where torch's kernel takes the first maximum's."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 3, (4, 3, 9, 8), generator=g).float()
    t = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        y, tan = jvp(MaxPool2x2(), (x,), (t,))
        y_ref, tan_ref = jvp(lambda u: F.max_pool2d(u, 2), (x,), (t,))
    assert torch.equal(y, y_ref) and torch.equal(tan, tan_ref)


@pytest.mark.parametrize(
    "attr, value", [("ceil_mode", True), ("padding", 1), ("stride", 1), ("kernel_size", 3), ("dilation", 2)]
)
def test_a_layer_whose_settings_were_changed_runs_torchs_kernel(monkeypatch, attr, value):
    """The strided views pool 2x2 windows with stride 2 only; a layer changed after it was built pools as torch would
    with its new settings."""
    calls = _counted(monkeypatch)
    pool = MaxPool2x2()
    setattr(pool, attr, value)
    ref = nn.MaxPool2d(2)
    setattr(ref, attr, value)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        out = pool(x)
    assert calls == [False]
    assert torch.equal(out, ref(x))
