"""torch's functorch "There is a performance drop because we have not yet implemented the batching rule for
aten::mish_backward" reached the caller 12 times on every request of a Mish network (stop 57's probe). The library
keeps exactly that warning from the caller inside its own calls and records the operations once in the report."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import VMAP_FALLBACK, quiet_vmap_fallbacks

torch.set_num_threads(1)


def _setup() -> tuple[MCMCUnlearner, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(80, 4), torch.randint(0, 3, (80,))
    model = nn.Sequential(nn.Linear(4, 8), nn.Mish(), nn.Linear(8, 3)).eval()
    bank = [{k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(8)]
    un = MCMCUnlearner(
        model,
        None,
        nll=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
        log_prior=lambda m: -0.5 * sum((p**2).sum() for p in m.parameters()),
        bank=bank,
    )
    return un, x, y


def test_a_mish_request_emits_no_vmap_fallback_warning() -> None:
    un, x, y = _setup()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = un.remove((x[:4], y[:4]), (x[4:], y[4:]), strict=False)
        second = un.remove((x[4:8], y[4:8]), (x[8:], y[8:]), strict=False)
    assert not [w for w in seen if VMAP_FALLBACK in str(w.message)], [str(w.message)[:90] for w in seen]
    assert "aten::mish_backward" in first.info["vmap_fallbacks"]  # recorded once, on the first request
    assert "vmap_fallbacks" not in second.info


def test_other_warnings_still_reach_the_caller() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_vmap_fallbacks() as ops:
            warnings.warn(VMAP_FALLBACK + "aten::foo. Please file us an issue on GitHub", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
        warnings.warn(VMAP_FALLBACK + "aten::bar. outside the library", UserWarning, stacklevel=1)
    assert ops == {"aten::foo"}
    assert [str(w.message)[:14] for w in seen] == ["something else", VMAP_FALLBACK[:14]]
