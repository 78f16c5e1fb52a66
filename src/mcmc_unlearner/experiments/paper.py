r"""The paper's unlearning procedure exactly as its reference code runs it, one deletion request at a time.

This is the ``paper`` baseline of the experiments and the benchmark: Fu, He & Tao, "Knowledge Removal in
Sampling-based Bayesian Inference", ICLR 2022, as implemented in their repository
(github.com/fshp971/mcmc-unlearning, commit ``3113ded``; files ``mcmc_unlearner.py`` — identical copies in
``GMM/`` and ``BNN/`` —, ``GMM/forget.py``, ``BNN/forget.py``, ``GMM/utils/data.py``). It is built on our seed
API (:class:`mcmc_unlearner.sgmcmcUnlearner`); the reference code was read, not copied.

**One request** (:func:`paper_forget`), in the reference's order (``GMM/forget.py`` lines 127–147,
``BNN/forget.py`` lines 191–215):

1. ``scaling = init_scaling / n`` with ``n`` the number of points *before* the removal (``forget.py``:
   ``scaling = args.ifs_scaling / len(train_sampler)`` is computed before ``train_sampler.remove(ii)``).
2. The removal solve (``mcmc_unlearner.py`` ``remove``, lines 120–173), with the request's points *still in*
   the sampler and the energy scaled to that same ``n`` (``model.n`` is only updated after the removal), so
   every sampler step and every Hessian-vector product sees the full-data energy
   :math:`F(θ,S) = -\log p(θ) + \tfrac{n}{|B|}\sum_{z∈B} h(θ,z)` and ``H`` is the full-data Hessian,
   including the points being removed:

   * ``G``: ``samp_T`` times, one sampler step on a fresh minibatch, then :math:`∇_θ\sum_{z∈S'} h(θ,z)` at
     the new state; ``G`` is their mean (lines 134–140);
   * LiSSA, ``iter_T`` rounds of :math:`h ← G + h - s\,\hat H h` from :math:`h_0 = G` (lines 146–163), where
     each :math:`\hat H h` is the mean over ``samp_T`` repetitions of: one sampler step on a minibatch, then a
     double-backward Hessian-vector product on *another*, freshly drawn minibatch (lines 152–155: two
     ``next(sampler)`` calls);
   * the live chain moves by :math:`s\,h ≈ H^{-1}G` (lines 168–173: ``θ ← θ − (−s·h)``).

3. Only then are the points removed from the sampler (``train_sampler.remove(ii)``; our
   :meth:`~mcmc_unlearner.data.RemovableDataset.remove`, which also restarts the shuffled pass, as the
   reference's ``DataSampler.remove`` resets its iterator) and ``model.n`` set to the new count.
4. Step size: the BNN code multiplies the sampler's ``lr`` by ``n_old / n_new`` (``BNN/forget.py`` line 215);
   the GMM code does not (``GMM/forget.py`` has no such line): ``rescale_lr`` selects which. Otherwise the
   sampler keeps the step size the chain ended its training with (both ``forget.py`` restore the optimizer
   state of the trained chain).

**Stored samples.** Neither ``forget.py`` keeps a sample bank: each shifts its one live chain, and the BNN
evaluation (``BNN/calc_kl.py``) draws posterior samples afterwards by continuing that chain on the remaining
data. Algorithm 1 of the paper moves every drawn sample by the same influence vector
:math:`-\mathcal I(S') = H^{-1}G` (an expectation over the posterior, so one vector for all samples). With a
``bank`` we do the latter: every stored sample moves by the shift ``s·h`` applied to the live chain (not by the
live chain's total displacement, which also contains the ``samp_T·(1 + iter_T)`` sampler steps).

**What we add.** The reference writes NaN into the model when LiSSA diverges; here a diverging or non-finite
recursion (the seed API's :class:`~mcmc_unlearner.errors.SolverDivergedError`) refuses the request and leaves
parameters, sampler state (momentum, step size, noise generator or global CPU/CUDA RNG), data set (mask and
shuffling state), gradients, ``model.n`` and the bank bit-identical. Requests are validated
(:meth:`~mcmc_unlearner.data.RemovableDataset.validate`) before anything runs.

Minibatches: the reference's ``DataSampler`` reshuffles every pass and drops the last partial batch
(``GMM/utils/data.py`` line 108: ``shuffle=True, drop_last=True``); :class:`~mcmc_unlearner.data.RemovableDataset`
does the same without loader processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..compat import sgmcmcUnlearner
from ..data import RemovableDataset
from ..options import shown_value
from ..samplers import scale_lr

__all__ = [
    "CIFAR10_REFERENCE",
    "FMNIST_REFERENCE",
    "GMM_REFERENCE",
    "PaperUnlearner",
    "ReferenceSettings",
    "paper_forget",
]

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ReferenceSettings:
    """The reference scripts' unlearning settings for one experiment.

    Attributes:
        iter_T: LiSSA rounds (``--ifs-iter-T``).
        samp_T: Sampler steps per expectation (``--ifs-samp-T``).
        init_scaling: LiSSA scaling numerator; ``s = init_scaling / n`` (``--ifs-scaling``).
        rescale_lr: Multiply the sampler's step size by ``n_old / n_new`` after each request (BNN code only).
        request_size: Points per request (``--ifs-rm-bs``).
    """

    iter_T: int
    samp_T: int
    init_scaling: float
    rescale_lr: bool
    request_size: int

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`paper_forget` / :class:`PaperUnlearner`."""
        d = asdict(self)
        d.pop("request_size")
        return d


#: ``GMM/scripts/sgld/forget.sh``: ``--ifs-scaling 1 --ifs-iter-T 32 --ifs-samp-T 5 --ifs-rm-bs 4``; no step-size
#: rescaling in ``GMM/forget.py``.
GMM_REFERENCE = ReferenceSettings(iter_T=32, samp_T=5, init_scaling=1.0, rescale_lr=False, request_size=4)
#: ``BNN/scripts/fmt/remove/unlearn/sgld-un6k.sh``: ``--ifs-scaling 0.05 --ifs-iter-T 64 --ifs-samp-T 1
#: --ifs-rm-bs 64``; ``BNN/forget.py`` line 215 rescales the step size.
FMNIST_REFERENCE = ReferenceSettings(iter_T=64, samp_T=1, init_scaling=0.05, rescale_lr=True, request_size=64)
#: ``BNN/scripts/c10/remove/unlearn/sgld-un5k.sh``: ``--ifs-scaling 0.08``, otherwise as Fashion-MNIST.
CIFAR10_REFERENCE = ReferenceSettings(iter_T=64, samp_T=1, init_scaling=0.08, rescale_lr=True, request_size=64)


def _default_energy(nll: Callable[[nn.Module, Batch], torch.Tensor]) -> Callable[[nn.Module, Batch, int], torch.Tensor]:
    def energy(model: nn.Module, batch: Batch, n: int) -> torch.Tensor:
        data = nll(model, batch).sum() * (n / batch[0].shape[0])
        return data - model.log_prior() if hasattr(model, "log_prior") else data

    return energy


def _model_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model.nll(batch)


class _ReferenceUnlearner(sgmcmcUnlearner):
    """The seed API's subclass as the reference ``forget.py`` writes it, with the energy scaled to ``self.n``.

    ``_apply_sample``/``_fun``/``_z_fun`` follow ``BNN/forget.py`` lines 15–34 (``GMM/forget.py`` lines 15–34):
    the model in training mode, ``F = -log p(θ) + n/|B|·Σ_B h``, ``Σ_{S'} h``. The seed class's ``_sampled_hvp``
    follows the reference ``mcmc_unlearner.py`` lines 150–160 (since stop 46 in the seed class itself): the sampler
    step and the Hessian-vector product use two separate minibatches.
    """

    n: int = 1
    energy: Callable[[nn.Module, Batch, int], torch.Tensor]
    nll: Callable[[nn.Module, Batch], torch.Tensor]

    def _apply_sample(self, z: Any) -> None:
        self.model.train()
        lo = self.energy(self.model, tuple(z), self.n)
        self.optimizer.zero_grad()
        lo.backward()
        self.optimizer.step()

    def _fun(self, z: Any) -> torch.Tensor:
        self.model.train()
        return self.energy(self.model, tuple(z), self.n)

    def _z_fun(self, z: Any) -> torch.Tensor:
        self.model.train()
        return self.nll(self.model, tuple(z)).sum()


def _generators(sampler: torch.optim.Optimizer) -> torch.Generator | None:
    return getattr(sampler, "generator", None)


class PaperUnlearner:
    """The reference procedure over a sequence of requests, holding its settings and (optionally) a bank.

    Args:
        model: The model whose live chain state is shifted; ``nll(batch)``/``log_prior()`` by default.
        sampler: The SG-MCMC optimizer of the live chain (its ``lr`` as the trained chain left it).
        iter_T, samp_T, init_scaling, rescale_lr: See :class:`ReferenceSettings` (e.g. ``**GMM_REFERENCE.kwargs()``).
        bank: Stored samples ``[S, D]`` (flat parameters); copied, shifted by Algorithm 1, read back as ``.bank``.
        nll: ``nll(model, batch) -> [B]`` per-datum ``h`` (default ``model.nll(batch)``).
        energy: ``energy(model, batch, n) -> scalar``, the minibatch ``F`` scaled to ``n`` points (default
            ``-log_prior + n/|B|·Σ nll``).
    """

    def __init__(
        self,
        model: nn.Module,
        sampler: torch.optim.Optimizer,
        *,
        iter_T: int,
        samp_T: int,
        init_scaling: float,
        rescale_lr: bool = False,
        bank: torch.Tensor | None = None,
        nll: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
        energy: Callable[[nn.Module, Batch, int], torch.Tensor] | None = None,
    ) -> None:
        if int(iter_T) < 1 or int(samp_T) < 1:
            raise ValueError(
                f"iter_T and samp_T must be >= 1, got iter_T={shown_value(iter_T)}, samp_T={shown_value(samp_T)}"
            )
        if not (float(init_scaling) > 0 and float(init_scaling) < float("inf")):
            raise ValueError(f"init_scaling must be a positive finite number, got {shown_value(init_scaling)}")
        self.model = model
        self.sampler = sampler
        self.rescale_lr = bool(rescale_lr)
        self.init_scaling = float(init_scaling)
        self.bank = None if bank is None else bank.detach().clone()
        un = _ReferenceUnlearner(
            model=model,
            optimizer=sampler,
            params=[p for p in model.parameters() if p.requires_grad],
            cpu=True,
            iter_T=int(iter_T),
            scaling=1.0,
            samp_T=int(samp_T),
        )
        un.nll = nll or _model_nll
        un.energy = energy or _default_energy(un.nll)
        self._un = un
        self.history: list[dict[str, Any]] = []

    @property
    def iter_T(self) -> int:
        return int(self._un.param_dict["iter_T"])

    @property
    def samp_T(self) -> int:
        return int(self._un.param_dict["samp_T"])

    def forget(self, ids: Sequence[int] | torch.Tensor, data: RemovableDataset) -> dict[str, Any]:
        """Apply one request and remove ``ids`` from ``data``; see :func:`paper_forget`."""
        out = _forget(self, ids, data)
        self.history.append(out)
        return out


def _forget(pu: PaperUnlearner, ids: Sequence[int] | torch.Tensor, data: RemovableDataset) -> dict[str, Any]:
    t0 = time.perf_counter()
    ids = data.validate(ids)
    batch = data.get(ids)
    n_before = len(data)
    un, model, sampler = pu._un, pu.model, pu.sampler
    # what remove() does not restore itself: data shuffling, noise RNG, gradients, training mode
    data_state = data.state_dict()
    gen = _generators(sampler)
    gen_state = gen.get_state() if gen is not None else None
    global_rng = torch.get_rng_state()
    on_cuda = any(p.is_cuda for p in un.params)
    cuda_rng = torch.cuda.get_rng_state_all() if on_cuda else None
    grads = [None if p.grad is None else p.grad.detach().clone() for p in un.params]
    was_training = model.training
    un.n = n_before  # step 1-2: energy and scaling from the count before removal
    un.param_dict["scaling"] = pu.init_scaling / n_before
    t_solve = time.perf_counter()
    try:
        result = un.remove(list(batch), data)  # the request's points are still in `data`
    except BaseException:
        data.load_state_dict(data_state)
        if gen is not None:
            gen.set_state(gen_state)
        torch.set_rng_state(global_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        with torch.no_grad():
            for p, g in zip(un.params, grads):
                p.grad = None if g is None else g.clone()
        model.train(was_training)
        raise
    solve_seconds = time.perf_counter() - t_solve
    model.train(was_training)
    data.remove(ids)  # step 3: only now leave the sampler
    n_after = len(data)
    if hasattr(model, "n"):
        model.n = n_after
    if pu.rescale_lr:  # step 4 (BNN/forget.py line 215)
        scale_lr(sampler, n_before / n_after)
    shift = result.x.detach()
    if pu.bank is not None:
        # Algorithm 1: every stored sample moves by the same vector
        pu.bank += shift.to(device=pu.bank.device, dtype=pu.bank.dtype)
    return {
        "n_removed": int(ids.numel()),
        "n_before": n_before,
        "n_after": n_after,
        "scaling": un.param_dict["scaling"],
        "iter_T": pu.iter_T,
        "samp_T": pu.samp_T,
        "sampler_steps": pu.samp_T * (1 + pu.iter_T),
        "hessian_products": pu.samp_T * pu.iter_T,
        "residual": float(result.residual),
        "shift_norm": float(shift.norm()),
        "shift": shift,
        "lr": float(sampler.param_groups[0]["lr"]),
        "solve_seconds": solve_seconds,
        "seconds": time.perf_counter() - t0,
    }


def paper_forget(
    model: nn.Module,
    sampler: torch.optim.Optimizer,
    data: RemovableDataset,
    ids: Sequence[int] | torch.Tensor,
    *,
    iter_T: int,
    samp_T: int,
    init_scaling: float,
    rescale_lr: bool = False,
    bank: torch.Tensor | None = None,
    nll: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
    energy: Callable[[nn.Module, Batch, int], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Apply one deletion request the way the paper's reference ``forget.py`` does (see the module docstring).

    Shifts the live chain (``model``'s parameters) by ``s·h ≈ H⁻¹G`` computed with the request's points still
    in ``data`` and the energy scaled to the count before removal, then removes ``ids`` from ``data``, sets
    ``model.n`` (if the model has it) to the new count and, with ``rescale_lr``, multiplies the sampler's step
    size by ``n_old / n_new``.

    Args:
        model, sampler, iter_T, samp_T, init_scaling, rescale_lr, nll, energy: As in :class:`PaperUnlearner`.
        data: The training set the live chain samples from, the request's points still in it.
        ids: Row ids to forget.
        bank: Optional stored samples ``[S, D]``, shifted **in place** by the same vector (Algorithm 1).

    Returns:
        A dict: ``n_removed``, ``n_before``, ``n_after``, ``scaling`` (``init_scaling / n_before``), ``iter_T``,
        ``samp_T``, ``sampler_steps``, ``hessian_products``, ``residual`` (the last LiSSA round's relative
        change, a stochastic quantity), ``shift_norm``, ``shift`` (the applied vector ``[D]``), ``lr`` (after the
        request), ``solve_seconds`` (what the reference times: the ``remove`` call) and ``seconds`` (the whole
        request, bookkeeping included).

    Raises:
        InvalidRequestError: bad ids (nothing runs).
        SolverDivergedError: LiSSA diverged or produced non-finite values (lower ``init_scaling``); model,
            sampler (state, step size, noise generator), global RNG, ``data``, gradients and ``bank`` are left
            bit-identical.
    """
    pu = PaperUnlearner(
        model, sampler, iter_T=iter_T, samp_T=samp_T, init_scaling=init_scaling, rescale_lr=rescale_lr, nll=nll,
        energy=energy,
    )  # fmt: skip
    out = _forget(pu, ids, data)
    if bank is not None:
        bank += out["shift"].to(device=bank.device, dtype=bank.dtype)
    return out
