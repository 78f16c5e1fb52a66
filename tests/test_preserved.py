"""``kronecker.preserved`` puts every parameter, buffer and module entry of the model back exactly (bits, objects)
after a block that evaluated it, for every tensor layout, and leaves an unchanged tensor's version counter alone.

Stop 56's review: it compared values with ``torch.equal``, which raises for sparse tensors (every request on a
model with a sparse adjacency buffer failed, and the remaining tensors were not restored) and treats ``-0.0`` as
``0.0``; a buffer reassigned out of place was left changed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.kronecker import preserved, same_bits


class Mix(nn.Module):
    """Rows mixed by a fixed sparse feature matrix (a graph network's adjacency), each row from that row alone."""

    def __init__(self, layout: torch.layout = torch.sparse_coo) -> None:
        super().__init__()
        a = torch.eye(6) + torch.diag(torch.ones(5), 1)
        self.register_buffer("adj", a.to_sparse() if layout == torch.sparse_coo else a.to_sparse_csr())
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1((self.adj @ x.T).T)))


def _bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.to_dense().clone() if v.layout != torch.strided else v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr], ids=["coo", "csr"])
def test_a_sparse_buffer_is_restored_and_a_request_on_it_runs(layout: torch.layout) -> None:
    torch.manual_seed(0)
    model = Mix(layout).eval()
    before = _bits(model)
    with preserved(model), torch.no_grad():
        model.l1.weight.add_(1.0)
        model.adj.values().mul_(3.0)  # the buffer written in place
    after = _bits(model)
    assert all(same_bits(before[k], after[k]) for k in before), [
        k for k in before if not torch.equal(before[k], after[k])
    ]
    # a whole request on the model: it failed with torch's NotImplementedError ('aten::equal' on SparseCPU)
    nll = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    x, y = torch.randn(80, 6), torch.randint(3, (80,))
    bank = [{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items() if k != "adj"} for _ in range(4)]
    un = MCMCUnlearner(
        model, None, nll=nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank
    )
    un.remove((x[:5], y[:5]), (x[5:], y[5:]))
    assert un._forward_checked and un.history


def test_bits_are_restored_and_unchanged_tensors_keep_their_version() -> None:
    """A sign flip of zeros (``torch.equal(-0.0, 0.0)`` is true), a write through ``.data`` (no version bump), a
    NaN left as it was; the untouched tensors keep their version counters."""
    m = nn.Linear(3, 2)
    with torch.no_grad():
        m.bias.zero_()
        m.weight[0, 0] = float("nan")
    w0, b0 = m.weight.clone(), m.bias.clone()
    versions = {k: v._version for k, v in m.state_dict(keep_vars=True).items()}
    with preserved(m), torch.no_grad():
        m.bias.neg_()
    assert not bool(torch.signbit(m.bias).any()) and same_bits(m.bias, b0)
    assert m.weight._version == versions["weight"]  # untouched (its NaN is equal to itself bit for bit)
    with preserved(m):
        m.weight.data.mul_(2.0)  # .data: another version counter
    assert same_bits(m.weight, w0)
    versions = {k: v._version for k, v in m.state_dict(keep_vars=True).items()}
    with preserved(m), torch.no_grad():
        m(torch.ones(1, 3))
    assert {k: v._version for k, v in m.state_dict(keep_vars=True).items()} == versions


def test_reassigned_replaced_and_deleted_entries_are_put_back() -> None:
    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mu", torch.zeros(3))
            self.lin = nn.Linear(3, 3)

    m = Norm()
    objects = dict(m.state_dict(keep_vars=True))
    values = {k: v.clone() for k, v in objects.items()}
    with pytest.raises(KeyError), preserved(m), torch.no_grad():
        m.mu = m.mu + 1.0
        m.lin.weight = nn.Parameter(torch.ones(3, 3))
        del m.lin.bias
        m.register_buffer("extra", torch.ones(1))
        raise KeyError("the block's own error")  # still restored, and the error is the block's
    now = dict(m.state_dict(keep_vars=True))
    assert now.keys() == objects.keys() and all(now[k] is objects[k] for k in objects)
    assert all(same_bits(now[k], values[k]) for k in values)


def test_same_bits_never_raises() -> None:
    a = torch.zeros(2, 2).to_sparse()
    assert not same_bits(a, a.clone()) and not same_bits(torch.zeros(2), torch.zeros(3))
    assert same_bits(torch.tensor(0.0), torch.tensor(0.0)) and not same_bits(torch.tensor(-0.0), torch.tensor(0.0))
    assert same_bits(torch.arange(4), torch.arange(4))


class _Shifted(nn.Module):
    """An MLP whose input shift is a buffer made under ``torch.inference_mode()`` (no version counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)
        with torch.inference_mode():
            shift = torch.linspace(-1, 1, 5)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x - self.shift)))


def test_an_inference_mode_buffer_is_compared_by_bits_and_written_back_under_inference_mode() -> None:
    """Stop 56's second review: it had no version counter, so it was always written back, and ``copy_`` into it
    outside inference mode raised 'could not restore ... changed by its own forward pass' on an unchanged model."""
    torch.manual_seed(0)
    m = _Shifted().eval()
    shift, s0 = m.shift, m.shift.clone()
    with preserved(m), torch.no_grad():
        m(torch.randn(4, 5))
    assert m.shift is shift and same_bits(m.shift, s0)
    with preserved(m), torch.inference_mode():
        m.shift.add_(1.0)  # an inference tensor can be written in place under inference mode: put back
    assert m.shift is shift and m.shift.is_inference() and same_bits(m.shift, s0)


def test_a_request_on_a_model_with_an_inference_mode_buffer_runs() -> None:
    torch.manual_seed(0)
    m = _Shifted().eval()
    live = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    bank = torch.stack([live + 0.05 * torch.randn_like(live) for _ in range(8)])
    x, y = torch.randn(60, 5), torch.randint(3, (60,))
    nll = lambda mm, b: F.cross_entropy(mm(b[0]), b[1], reduction="none")  # noqa: E731
    prior = lambda mm: -0.5 * sum((p**2).sum() for p in mm.parameters())  # noqa: E731
    un = MCMCUnlearner(m, None, nll=nll, log_prior=prior, bank=bank)
    un.propose((x[:4], y[:4]), (x[4:], y[4:]))  # raised RuntimeError('could not restore 1 parameter(s)/buffer(s)')
    assert same_bits(m.shift, torch.linspace(-1, 1, 5))


def test_entry_order_children_and_plain_attributes_are_put_back() -> None:
    """Stop 56's second review: a re-registered parameter came back at the end of ``_parameters`` (the flat vector's
    order changed), and children added or deleted in the block stayed so (a lazily built head kept its parameters)."""
    from mcmc_unlearner.curvature import ParamSpec

    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    flat = ParamSpec.flatten_module(m).clone()
    with preserved(m):
        m.register_parameter("w", m._parameters.pop("weight"))  # renamed in the block
    assert list(m._parameters) == ["weight", "bias"] and torch.equal(ParamSpec.flatten_module(m), flat)

    class LazyHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = None  # a plain attribute until the first forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.head is None:
                self.head = nn.Linear(4, 2)
            return self.head(self.body(x))

    lazy = LazyHead()
    with preserved(lazy), torch.no_grad():
        lazy(torch.randn(2, 3))
    assert lazy.head is None and [k for k, _ in lazy.named_parameters()] == ["body.weight", "body.bias"]
    seq = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    children = list(seq)
    with preserved(seq):
        del seq[1]
        seq.append(nn.Tanh())
    assert list(seq) == children


def test_an_lstm_reads_its_restored_weights() -> None:
    """An LSTM's forward reads ``_flat_weights``, not ``_parameters``: restoring a weight reassigned in the block left
    it computing with the block's (0.23 off)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        y0 = lstm(x)[0]
    with preserved(lstm):
        lstm.weight_ih_l0 = nn.Parameter(torch.zeros_like(lstm.weight_ih_l0))
    with torch.no_grad():
        assert torch.equal(lstm(x)[0], y0)


def test_a_backward_in_the_block_leaves_the_callers_grad_alone() -> None:
    """``.grad`` was saved by reference: a backward in the block added into the caller's gradient in place."""
    torch.manual_seed(0)
    m = nn.Linear(3, 1)
    m(torch.randn(4, 3)).sum().backward()
    g, g0 = m.weight.grad, m.weight.grad.clone()
    with preserved(m):
        assert m.weight.grad is None
        m(torch.randn(4, 3)).sum().backward()
    assert m.weight.grad is g and torch.equal(g, g0) and m.bias.grad is not None
