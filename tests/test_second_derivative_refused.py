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
