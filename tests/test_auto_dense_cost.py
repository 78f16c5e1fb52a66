"""solver='auto' weighs the dense build's cost on the first rows read (issue 11, stop 58's probe): a ConvTranspose2d
decoder of 64 outputs per row, whose dense Gauss-Newton matrix took 8x its whole SGLD chain, and a frozen
nn.EmbeddingBag fed by masked ids, whose dense Hessian fell back to one reverse-mode product per column and draw,
get K-FAC with the estimates in solver_reason; a small MLP, whose dense Hessian is cheap, keeps it. Stop 59: a
tied-head language model read at 11 positions a row, whose every weight a row's gradient uses 10 times (its dense
Hessian 36 s CPU, 8x its chain), gets K-FAC too."""

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.options import SolverName, weigh_dense_build

torch.set_num_threads(1)


class ConvDecoder(nn.Module):
    """A convolutional autoencoder of 943 parameters whose ConvTranspose2d decoder gives 64 outputs per row."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 6))
        self.dec_in = nn.Linear(6, 64)
        self.dec = nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.dec_in(self.enc(x.view(-1, 1, 8, 8)))).view(-1, 4, 4, 4)
        return self.dec(h).view(-1, 64)


class Bag(nn.Module):
    """A frozen EmbeddingBag over each row's nonzero ids (a boolean mask, which vmap cannot batch) and an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 16, mode="mean")
        self.bag.weight.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lens = (ids != 0).sum(1)
        offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)[:-1]])
        return self.head(self.bag(ids[ids != 0], offsets))


def _prior(m: nn.Module) -> torch.Tensor:
    return -0.5 * sum((p**2).sum() for n, p in m.named_parameters() if n != "bag.weight")


def _bank(model: nn.Module, draws: int = 6, scale: float = 0.02) -> torch.Tensor:
    theta = ParamSpec.flatten_module(model).detach()
    return theta + scale * torch.randn(draws, theta.numel())


def _reconstruction(m: nn.Module, b: tuple) -> torch.Tensor:
    return 0.5 * ((m(b[0]) - b[0]) ** 2).sum(1) / 0.3**2


def _ids(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(3, 11, (n,), generator=g)
    ids = torch.randint(1, 12, (n, 10), generator=g)
    ids[torch.arange(10)[None] >= lengths[:, None]] = 0
    return ids, ((ids == 5).sum(1) > (ids == 7).sum(1)).long()


def _ce(m: nn.Module, b: tuple) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1], reduction="none")


def test_a_decoder_with_64_outputs_per_row_gets_kfac_with_the_gauss_newton_estimate() -> None:
    torch.manual_seed(0)
    model, x = ConvDecoder(), torch.rand(60, 64)
    un = MCMCUnlearner(model, None, nll=_reconstruction, log_prior=_prior, bank=_bank(model))
    assert un.solver is SolverName.GGN  # (943 parameters with convolutions: the construction's choice, as before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.propose((x[:6],), (x[6:],)).report
    # before: the dense Gauss-Newton matrix, 64 backward passes per row and a (rows·64) x 943 x 943 product
    assert report.solver == "kfac" and un.solver is SolverName.KFAC
    reason = report.info["solver_reason"]
    assert "64 outputs per row × 943 parameters" in reason and "3,772 row products per row and draw" in reason
    assert "over exact_max_dim 1000" in reason and "pass solver='ggn'" in reason
    # K-FAC's own defaults, as solver='auto' gives them at construction, and the mean bank shift
    assert un.curvature_draws == 8 and un.refresh_every == 20 and un.bank_shift.value == "mean"
    assert un.recenter_every == 10


def test_a_masked_embedding_bag_whose_product_cannot_be_vectorised_gets_kfac() -> None:
    torch.manual_seed(0)
    model = Bag()
    ids, y = _ids(200)
    un = MCMCUnlearner(model, None, nll=_ce, log_prior=_prior, bank=_bank(model))
    assert un.solver is SolverName.EXACT  # 306 trainable parameters
    remaining = DataLoader(TensorDataset(ids[20:], y[20:]), batch_size=64)  # a minibatch per draw: vmapped ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.propose((ids[:20], y[:20]), remaining).report
    assert report.solver == "kfac"
    reason = report.info["solver_reason"]
    assert "the dense Hessian (306 columns) × 12" in reason and "3,672 row products per row and draw" in reason
    assert "vectorised product failed" in reason


def test_the_same_embedding_bag_over_listed_rows_keeps_the_dense_hessian() -> None:
    torch.manual_seed(0)
    model = Bag()
    ids, y = _ids(200)
    un = MCMCUnlearner(model, None, nll=_ce, log_prior=_prior, bank=_bank(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.propose((ids[:20], y[:20]), (ids[20:], y[20:])).report  # every row shared by the draws: vectorised
    assert report.solver == "exact" and report.info["solver_reason"] == "306 parameters <= exact_max_dim 1000"
    assert report.info["dense_cost"] == (
        "the dense Hessian (306 columns): 306 row products per row and draw, within the 1000 of exact_max_dim"
    )


def test_a_small_mlp_keeps_the_dense_hessian_and_reports_its_estimate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(120, 8), torch.randint(3, (120,))
    un = MCMCUnlearner(model, None, nll=_ce, log_prior=_prior, bank=_bank(model))
    remaining = DataLoader(TensorDataset(x[10:], y[10:]), batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.propose((x[:10], y[:10]), remaining).report
    assert report.solver == "exact" and un.bank_shift.value == "affine"
    assert "the dense Hessian (147 columns): 147 row products" in report.info["dense_cost"]


def test_fit_weighs_the_dense_build_before_building_it() -> None:
    torch.manual_seed(0)
    model, x = ConvDecoder(), torch.rand(60, 64)
    un = MCMCUnlearner(model, None, nll=_reconstruction, log_prior=_prior, bank=_bank(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        un.fit((x,))
    assert un.solver is SolverName.KFAC and "3,772 row products" in un.solver_reason


def test_a_state_saved_after_the_switch_continues_as_kfac_in_a_fresh_auto_unlearner() -> None:
    """The state names its solver: a fresh ``auto`` unlearner (still on the Gauss-Newton matrix, its estimate
    pending) that loads a state saved after the switch to K-FAC takes K-FAC and its defaults too, and continues as
    the uninterrupted run does."""

    def build() -> tuple[MCMCUnlearner, nn.Module]:
        torch.manual_seed(0)
        model = ConvDecoder()
        return MCMCUnlearner(model, None, nll=_reconstruction, log_prior=_prior, bank=_bank(model)), model

    x = torch.rand(60, 64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        un, model = build()
        un.remove((x[:6],), (x[6:],), strict=False)
        tensors, meta = un.curvature_state()
        assert meta["solver"] == "kfac"
        un2, model2 = build()
        assert un2.solver is SolverName.GGN
        model2.load_state_dict(model.state_dict())
        un2.bank = un.bank.clone()
        un2.load_curvature_state(tensors, meta)  # refused before: "saved by solver='kfac'" (no switch to take)
        assert un2.solver is SolverName.KFAC and un2.curvature_draws == 8 and un2.refresh_every == 20
        un2.remove((x[6:12],), (x[12:],), strict=False)
        un.remove((x[6:12],), (x[12:],), strict=False)
    assert torch.equal(un.bank, un2.bank)


def test_a_solver_given_by_name_is_never_weighed() -> None:
    torch.manual_seed(0)
    model, x = ConvDecoder(), torch.rand(60, 64)
    un = MCMCUnlearner(model, None, nll=_reconstruction, log_prior=_prior, bank=_bank(model), solver="ggn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.propose((x[:6],), (x[6:],)).report
    assert report.solver == "ggn" and "dense_cost" not in report.info


@pytest.mark.parametrize(
    ("args", "expected", "words"),
    [
        # a 954-parameter CNN of 10 classes: 597 row products, within exact_max_dim (the GGN auto took, kept)
        ((SolverName.GGN, 954, 10, True, 1000, True, True), SolverName.GGN, "597 row products"),
        ((SolverName.GGN, 943, 64, True, 1000, True, True), SolverName.KFAC, "3,772 row products"),
        # no K-FAC, and convolutions (their Hessian products cost hundreds of times a dense layer's): kept
        ((SolverName.GGN, 943, 64, True, 1000, False, True), SolverName.GGN, "no cheaper path"),
        ((SolverName.EXACT, 1000, 0, True, 1000, True, False), SolverName.EXACT, "within"),
        ((SolverName.EXACT, 306, 0, False, 1000, True, False), SolverName.KFAC, "3,672 row products"),
        # no K-FAC: CG's 100 products x 3 solves x 12 against the dense Hessian's 306 x 12 (cheaper) / 200 x 12 (not)
        ((SolverName.EXACT, 306, 0, False, 1000, False, False), SolverName.CG, "matrix-free CG"),
        ((SolverName.EXACT, 200, 0, False, 1000, False, False), SolverName.EXACT, "is no cheaper"),
    ],
)
def test_weigh_dense_build_rule(args: tuple, expected: SolverName, words: str) -> None:
    solver, why = weigh_dense_build(*args)
    assert solver is expected and words in why


class CountingConv(nn.Module):
    """A small convolutional network (the Gauss-Newton matrix) whose forward counts its calls in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3)
        self.fc = nn.Linear(12, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(torch.tanh(self.conv(x.unsqueeze(1))).flatten(1))


def test_the_estimate_leaves_the_models_buffers_and_the_global_rng_as_they_were() -> None:
    """The probe's forward on the live model ran before the request's snapshot: a discarded proposal left the
    model's step counter moved by one (propose leaves the model as it was)."""
    torch.manual_seed(0)
    model = CountingConv()
    x, y = torch.randn(80, 8), torch.randint(3, (80,))
    un = MCMCUnlearner(model, None, nll=_ce, log_prior=_prior, bank=_bank(model))
    assert un.solver is SolverName.GGN
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.propose((x[:5], y[:5]), (x[5:], y[5:])).report
    assert report.solver == "ggn" and "dense_cost" in report.info  # (weighed, and kept)
    assert int(model.calls) == 0 and torch.equal(torch.get_rng_state(), rng)


def test_listed_rows_read_a_minibatch_per_draw_are_weighed_as_such() -> None:
    """5,580 listed rows at 6 draws are over FULL_ROWS_MAX: the dense Hessian reads a minibatch per draw, whose
    product vmap cannot batch over the masked ids; the estimate had taken every row as shared (vectorised, 306) and
    kept the dense Hessian, built with 612 reverse-mode products."""
    torch.manual_seed(0)
    model = Bag()
    ids, y = _ids(5600)
    un = MCMCUnlearner(model, None, nll=_ce, log_prior=_prior, bank=_bank(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.propose((ids[:20], y[:20]), (ids[20:], y[20:])).report
    assert report.solver == "kfac" and "3,672 row products per row and draw" in report.info["solver_reason"]


def test_a_state_saved_before_the_first_request_is_weighed_after_loading() -> None:
    """A checkpoint of a fresh ``auto`` unlearner (its dense pick not weighed yet) loaded into another: the first
    request weighs it as the run it was saved from does (before: the Gauss-Newton matrix kept, 8x the chain)."""

    def build() -> MCMCUnlearner:
        torch.manual_seed(0)
        model = ConvDecoder()
        return MCMCUnlearner(model, None, nll=_reconstruction, log_prior=_prior, bank=_bank(model))

    x = torch.rand(60, 64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        un = build()
        tensors, meta = un.curvature_state()
        assert meta["solver"] == "ggn"
        un2 = build()
        un2.load_curvature_state(tensors, meta)
        first = un.remove((x[:6],), (x[6:],), strict=False)
        second = un2.remove((x[:6],), (x[6:],), strict=False)
    assert first.solver == second.solver == "kfac"
    assert torch.equal(un.bank, un2.bank)


def test_fit_over_a_plain_iterator_leaves_the_estimate_to_the_first_request() -> None:
    """fit() builds nothing for a dense solver, and over a plain iterator cannot read ahead: the first request still
    weighs the dense pick on its removed rows, as without fit (before: the Gauss-Newton matrix kept, 8x the chain)."""
    x = torch.rand(60, 64, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(x[6:]), batch_size=16)

    def endless() -> Iterator[list[torch.Tensor]]:
        while True:
            yield from loader

    torch.manual_seed(0)
    model = ConvDecoder()
    un = MCMCUnlearner(model, None, nll=_reconstruction, log_prior=_prior, bank=_bank(model))
    rows = endless()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert un.fit(rows, n_remaining=54).solver == "ggn"  # (nothing built ahead, no minibatch read)
        report = un.propose((x[:6],), rows, n_remaining=54).report
    assert report.solver == "kfac" and "3,772 row products" in report.info["solver_reason"]


class TiedLM(nn.Module):
    """A next-token model of 612 parameters whose head is tied to its embedding, read at all 11 positions of a row:
    each weight is used about 10 times per row (stop 59's probe: its dense Hessian took 36 s CPU, 8x its chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def _tokens_nll(m: nn.Module, b: tuple) -> torch.Tensor:
    return F.cross_entropy(m(b[0]).transpose(1, 2), b[1], reduction="none").sum(1)


def test_a_sequence_model_whose_rows_use_each_weight_ten_times_leaves_the_dense_hessian() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    s = torch.randint(20, (200, 12))
    un = MCMCUnlearner(model, None, nll=_tokens_nll, log_prior=_prior, bank=_bank(model))
    remaining = DataLoader(TensorDataset(s[10:, :-1], s[10:, 1:]), batch_size=32, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = un.propose((s[:10, :-1], s[:10, 1:]), remaining).report
    assert report.solver != "exact"
    assert "a row's gradient uses each parameter 10.4 times a dense layer's" in un.solver_reason
    assert "6,336 row products" in un.solver_reason


def _frozen(model: nn.Module, *layers: int) -> nn.Module:
    for i in layers:
        for p in model[i].parameters():
            p.requires_grad_(False)
    return model


def _weighed(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[MCMCUnlearner, Any]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    un = MCMCUnlearner(
        model,
        None,
        nll=_ce,
        log_prior=lambda m: -0.5 * sum((p**2).sum() for n, p in m.named_parameters() if n in names),
        bank=_bank(model),
    )
    remaining = DataLoader(TensorDataset(x[10:], y[10:]), batch_size=32, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return un, un.propose((x[:10], y[:10]), remaining).report


def test_a_frozen_layer_the_gradient_passes_through_counts_in_the_estimate() -> None:
    """157 trainable parameters around a frozen 64-wide layer, which the first layer's gradient passes through
    (its input gradient, a product over the row, is part of every Hessian column): counted, and still within
    exact_max_dim."""
    torch.manual_seed(0)
    model = _frozen(
        nn.Sequential(nn.Linear(8, 2), nn.Tanh(), nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2), nn.Linear(2, 3)), 2
    )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 157
    _, report = _weighed(model, torch.randn(120, 8), torch.randint(3, (120,)))
    assert report.solver == "exact"
    assert "(157 columns × 1.31: a row's gradient uses each parameter 1.31 times" in report.info["dense_cost"]
    assert "206 row products per row and draw, within" in report.info["dense_cost"]


def test_a_frozen_backbone_before_the_trained_layers_is_not_counted() -> None:
    """A frozen backbone's forward does not depend on the parameters: the vectorised Hessian computes it once for
    every column (a 771-parameter head behind a frozen 32-256-256 backbone: its dense Hessian 1.3 s CPU, 1.2 s on
    the backbone's features; stop 59's review). Counting the whole gradient gave 32.5 and took K-FAC."""
    torch.manual_seed(0)
    model = _frozen(
        nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3)), 0, 2
    )
    un, report = _weighed(model, torch.randn(60, 32), torch.randint(3, (60,)))
    assert report.solver == "exact", un.solver_reason
    assert report.info["dense_cost"] == (
        "the dense Hessian (771 columns): 771 row products per row and draw, within the 1000 of exact_max_dim"
    )
    # the frozen input layer of the 139-parameter head is not passed through either: not counted (it was 1.88)
    small = _frozen(nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 2), nn.Linear(2, 3)), 0)
    _, report = _weighed(small, torch.randn(120, 8), torch.randint(3, (120,)))
    assert report.info["dense_cost"].startswith("the dense Hessian (139 columns): 139 row products")


@pytest.mark.parametrize(
    ("uses", "expected", "words"),
    [
        (1.0, SolverName.EXACT, "612 row products per row and draw, within"),
        (0.5, SolverName.EXACT, "612 row products per row and draw, within"),
        (10.35, SolverName.KFAC, "6,335 row products"),
    ],
)
def test_weigh_dense_build_counts_a_rows_uses_of_each_parameter(uses: float, expected: SolverName, words: str) -> None:
    solver, why = weigh_dense_build(SolverName.EXACT, 612, 0, True, 1000, True, False, uses=uses)
    assert solver is expected and words in why


_PROBE_USES_FRESH = r"""
import json, sys
import torch
import torch.nn.functional as F
from torch import nn
from mcmc_unlearner import MCMCUnlearner
torch.manual_seed(0)
model = nn.Sequential(nn.Conv1d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))  # weights used at 6 positions
dim = sum(p.numel() for p in model.parameters())
bank = torch.randn(4, dim) * 0.3
nll = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")
prior = lambda m: -0.5 * sum((p**2).sum() for p in m.parameters())
un = MCMCUnlearner(model, None, nll=nll, log_prior=prior, bank=bank)
x, y = torch.randn(5, 1, 8), torch.tensor([0, 1, 2, 0, 1])
loaded = lambda: sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules)
before = loaded()
uses = un._dense_probe_uses((x, y))
after = loaded()
from torch.func import grad
from torch.utils.flop_counter import FlopCounterMode
f = un._h_f()
with FlopCounterMode(display=False) as g:
    grad(f)(un.bank[0], x[:2], y[:2])
with FlopCounterMode(display=False) as fw:
    f(un.bank[0], x[:2], y[:2])
old = max(1.0, (g.get_total_flops() - fw.get_total_flops()) / 2 / (4 * dim))
print(json.dumps({"before": before, "after": after, "uses": uses, "old": old}))
"""


def test_the_dense_probes_flop_count_imports_neither_dynamo_nor_sympy() -> None:
    """``_dense_probe_uses`` counted with ``FlopCounterMode`` itself on ``torch.func.grad``: each imports
    ``torch._dynamo`` and sympy at its first use (829 modules, 1.05 s CPU, stop 69). Through ``_count_flops`` on
    ``torch.autograd.grad`` a fresh process leaves both unimported, and the count is the one the old path gave."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _PROBE_USES_FRESH]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] == [] and got["after"] == [], got
    assert got["uses"] == got["old"] > 1.0, got


class _OldStyleSquare(torch.autograd.Function):
    """A custom autograd.Function without ``setup_context``: ``torch.func`` transforms refuse it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _ConvSquare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3)
        self.head = nn.Linear(18, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_OldStyleSquare.apply(self.conv(x)).flatten(1))


def test_the_dense_probe_counts_a_model_torch_func_cannot_transform() -> None:
    """``torch.func.grad`` refused an ``autograd.Function`` without ``setup_context`` and the probe read 1 (not
    counted); through ``torch.autograd.grad`` (stop 69) it counts the same uses as the model without the Function:
    its convolution's weights used at 6 positions a row (1.17)."""
    torch.manual_seed(0)
    model = _ConvSquare()
    dim = sum(p.numel() for p in model.parameters())
    nll = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    un = MCMCUnlearner(model, None, nll=nll, bank=torch.randn(4, dim) * 0.3)
    rows = (torch.randn(5, 1, 8), torch.tensor([0, 1, 2, 0, 1]))
    plain = nn.Sequential(model.conv, nn.Flatten(), model.head)  # the same FLOPs: the square is elementwise
    ref = MCMCUnlearner(plain, None, nll=nll, bank=un.bank.clone())
    assert un._dense_probe_uses(rows) == pytest.approx(ref._dense_probe_uses(rows)) and un._dense_probe_uses(rows) > 1.1
