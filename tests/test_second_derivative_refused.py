"""An nll through an operation torch differentiates once but not twice (stop 57's probe: F.ctc_loss, whose
backward has no derivative) died inside the request, after seconds of work, with torch's raw "derivative for
aten::_ctc_loss_backward is not implemented". The first request's forward check takes one Hessian-vector product by
double backward and refuses before any work, naming the operation and a way out."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner

torch.set_num_threads(1)


def _ctc(m: nn.Module, b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.ctc_loss(m(b[0]).transpose(0, 1), b[1], b[2], b[3], reduction="none")


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("solver", ["auto", "kfac"])
def test_ctc_loss_is_refused_before_any_work(solver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    n, T, S, C = 40, 6, 2, 4
    x, tgt = torch.randn(n, T, 5), torch.randint(1, C, (n, S))
    il, tl = torch.full((n,), T), torch.full((n,), S)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, C), nn.LogSoftmax(-1))
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    un = MCMCUnlearner(
        model, None, nll=_ctc, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank,
        solver=solver,
    )  # fmt: skip

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the request started its work")

    monkeypatch.setattr(un, "_propose", no_work)
    rows = lambda s: (x[s], tgt[s], il[s], tl[s])  # noqa: E731
    with pytest.raises(ValueError, match=r"cannot differentiate a second time \(aten::_ctc_loss_backward\).*logsumexp"):
        un.remove(rows(slice(0, 5)), rows(slice(5, None)))
    assert not un.history
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Gated(nn.Module):
    """A MobileNet-style squeeze-excitation gate through ``F.hardsigmoid`` (stop 60's probe)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.se, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.hardswish(self.body(x))
        return self.out(h * F.hardsigmoid(self.se(h)))


def test_hardsigmoid_is_refused_before_the_dense_probe_naming_its_rewrite(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop 60's probe: a Hardsigmoid gate (no second derivative in torch) was refused only after ``auto``'s dense-cost
    probe had run (1.8 s, its first vmap importing torch's compiler stack), with the CTC/EmbeddingBag/cdist examples
    only; now before that probe, naming ``F.relu6(x + 3) / 6``, which has the same values and a second derivative."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model = _Gated()
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nll = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    un = MCMCUnlearner(
        model, None, nll=nll, log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()), bank=bank
    )

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the request started its work")

    for name in ("_propose", "_weigh_dense_build", "_take_cg_if_read_outside"):
        monkeypatch.setattr(un, name, no_work)
    for _ in range(2):  # the first request and a later one
        with pytest.raises(ValueError, match=r"\(aten::hardsigmoid_backward\).*F\.relu6\(x \+ 3\) / 6"):
            un.remove((x[:5], y[:5]), (x[5:], y[5:]))
    assert not un.history
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the rewrite has the same values and a second derivative
    z = torch.randn(50, requires_grad=True)
    assert torch.equal(F.relu6(z + 3) / 6, F.hardsigmoid(z))
    (g,) = torch.autograd.grad((F.relu6(z + 3) / 6).square().sum(), z, create_graph=True)
    torch.autograd.grad(g.sum(), z)
