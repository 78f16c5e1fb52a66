"""The seed repository's subclass API, verbatim: ``sgmcmcUnlearner``.

Usage (from the seed README; ``cpu=True`` on a machine without CUDA)::

    class myUnlearner(sgmcmcUnlearner):
        def _apply_sample(self, z): ...   # one SG-MCMC step on minibatch z
        def _fun(self, z): ...            # F(θ, S) estimated on minibatch z
        def _z_fun(self, z): ...          # Σ_{z_j∈S'} h(θ, z_j) on the removed batch z

    unlearner = myUnlearner(model=model, optimizer=optimizer, params=model.parameters(),
                            cpu=True, iter_T=64, scaling=0.1, samp_T=5)
    unlearner.param_dict['scaling'] = init_scaling / remaining_n
    unlearner.remove([xx, yy], remaining_sampler)

The algorithm is the paper's (Fu, He & Tao, ICLR 2022, Alg. 1 with the LiSSA recursion): ``G`` is the mean of
``∇Σh`` over ``samp_T`` sampler steps; ``H⁻¹G`` comes from ``iter_T`` rounds of ``h ← G + h − s·H·h`` in which
every ``H·h`` is averaged over ``samp_T`` repetitions of one sampler step on a minibatch and a double-backward
product on the live model on another, freshly drawn one (as the seed code does: two ``next(sampler)`` calls;
until stop 46 this class used the sampler step's minibatch for the product); then ``θ ← θ + s·h``. The
recursion itself is :func:`mcmc_unlearner.solvers.lissa`, shared
with :class:`~mcmc_unlearner.unlearner.MCMCUnlearner`. A diverging recursion raises
:class:`~mcmc_unlearner.errors.SolverDivergedError` and restores the parameters and sampler state
bit for bit (the seed code silently wrote NaN).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .curvature import plain_attention
from .errors import InvalidRequestError
from .options import finite, is_number, shown_value, whole
from .solvers import SolveResult, lissa
from .stream import _as_batch, _repeated_rows, check_finite_batch
from .unlearner import _sampler_generator_state, _set_sampler_generator_state

__all__ = ["sgmcmcUnlearner"]

#: ``last_result.converged``: the relative change of LiSSA's last round at most this (the rounds all run).
SEED_API_TOL = 1e-4


class _Minibatches:
    """The remaining-data ``sampler`` as an endless iterator: an iterator is drawn from as given, an iterable (a
    ``DataLoader``, a list of batches) is restarted at its end; an iterator that ends raises
    :class:`InvalidRequestError` saying how many minibatches a request draws."""

    def __init__(self, source: Any, need: int) -> None:
        self.need, self.drawn = need, 0
        if isinstance(source, Iterator) or (
            callable(getattr(source, "__next__", None)) and not hasattr(source, "__iter__")
        ):
            # the seed repository's own utils.DataSampler defines __next__ (endless) but no __iter__
            self.again, self.it = None, source
        elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
            self.again, self.it = source, iter(source)
        else:
            raise InvalidRequestError(
                "the remaining-data sampler must be an iterator or iterable of minibatches, got "
                f"{type(source).__name__}"
            )

    def __iter__(self) -> _Minibatches:
        return self

    def __next__(self) -> Any:
        for _ in range(2):
            try:
                z = next(self.it)
                self.drawn += 1
                fields = z if isinstance(z, (list, tuple)) else (z,)
                # a NaN row drove the sampler step to NaN parameters, and the recursion's refusal then blamed the
                # scaling (stop 46's probe)
                check_finite_batch(
                    tuple(t for t in fields if isinstance(t, torch.Tensor)),
                    "the remaining data",
                    f"of the sampler's minibatch {self.drawn} (numbered within it)",
                )
                return z
            except StopIteration:
                if self.again is None:
                    break
                self.it = iter(self.again)  # an epoch of a DataLoader ended: the next one
        what = "iterator" if self.again is None else f"{type(self.again).__name__} (it yields no minibatch)"
        raise InvalidRequestError(
            f"the remaining-data sampler ran out after {self.drawn} minibatches: its {what} ended, and remove() draws "
            f"samp_T·(1 + 2·iter_T) = {self.need} (one per sampler step, one per Hessian product); pass the "
            "DataLoader itself (restarted at every epoch's end) or an endless iterator, e.g. a generator that loops "
            "over the loader; the parameters and sampler state were restored"
        )


def _scalar(value: Any) -> Any:
    """A one-element tensor as its Python number (``init_scaling / remaining_n`` with a tensor count is one), any
    other value as given."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        return value.item()
    return value


def _checked_params(param_dict: dict[str, Any], where: str) -> tuple[int, int, float | str]:
    """``param_dict``'s ``samp_T``, ``iter_T`` and ``scaling`` as ``remove`` uses them, or a refusal naming the
    value and its range before anything is touched (``scaling=10**400`` raised Python's OverflowError from
    ``float()``, ``iter_T=2.5`` ran 2 rounds, ``samp_T=nan`` failed inside ``int()``).

    Args:
        param_dict: The unlearner's ``param_dict``.
        where: How the message names a key: ``"{}"`` (the constructor's argument) or ``"param_dict['{}']"``.

    Raises:
        ValueError: A count that is not an integer >= 1, or a scaling that is neither ``'auto'`` nor a finite
            number > 0.
    """
    counts = []
    for key in ("samp_T", "iter_T"):
        counts.append(whole(f"sgmcmcUnlearner: {where.format(key)}", _scalar(param_dict.get(key)), 1))
    scaling = _scalar(param_dict.get("scaling"))
    if not (scaling == "auto" or (is_number(scaling) and finite(scaling) and float(scaling) > 0)):
        raise ValueError(
            f"sgmcmcUnlearner: {where.format('scaling')} must be 'auto' or a finite number > 0 (the seed recommends "
            f"init_scaling / remaining_n), got {shown_value(scaling)}"
        )
    return counts[0], counts[1], scaling if scaling == "auto" else float(scaling)


class sgmcmcUnlearner:
    """Base class of the seed API; override ``_apply_sample``, ``_fun`` and ``_z_fun``.

    Args:
        model: The Bayesian model.
        optimizer: The SG-MCMC sampler (e.g. :class:`~mcmc_unlearner.samplers.SGLD`).
        params: The parameters to shift (``model.parameters()``).
        cpu: Keep everything on the CPU (the seed moves batches with ``.cuda()`` otherwise).
        iter_T: LiSSA rounds.
        scaling: LiSSA scaling ``s`` (the seed recommends ``init_scaling / remaining_n``).
        samp_T: Monte-Carlo sampler steps per expectation.

    Raises:
        ValueError: ``iter_T`` or ``samp_T`` is not an integer >= 1, or ``scaling`` is neither ``'auto'`` nor a
            finite number > 0 (``remove`` checks ``param_dict`` again, as the seed sets its scaling there).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: Iterable[torch.Tensor],
        cpu: bool = True,
        iter_T: int = 64,
        scaling: float = 0.1,
        samp_T: int = 5,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        # as the seed does: parameters with requires_grad=False (frozen layers) are neither differentiated nor
        # shifted (stop 32 refused them, which broke the seed's own call params=model.parameters())
        _checked_params({"iter_T": iter_T, "scaling": scaling, "samp_T": samp_T}, "{}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params holds no tensor with requires_grad=True: there is nothing to unlearn")
        self.cpu = cpu
        self.param_dict: dict[str, Any] = {"iter_T": iter_T, "scaling": scaling, "samp_T": samp_T}
        self.last_result: SolveResult | None = None

    # ---- to override -------------------------------------------------------------------------
    def _apply_sample(self, z: Any) -> None:
        """Take one SG-MCMC step on minibatch ``z``."""
        raise NotImplementedError("override _apply_sample(self, z) with one sampler step")

    def _fun(self, z: Any) -> torch.Tensor:
        """Return ``F(θ, S)`` estimated on minibatch ``z`` (a scalar with autograd history)."""
        raise NotImplementedError("override _fun(self, z) to return the minibatch energy F")

    def _z_fun(self, z: Any) -> torch.Tensor:
        """Return ``Σ_{z_j∈z} h(θ, z_j)`` for the removed batch ``z``."""
        raise NotImplementedError("override _z_fun(self, z) to return the removed points' summed NLL")

    # ---- the algorithm ---------------------------------------------------------------------------
    def _grad(self, loss: torch.Tensor, create_graph: bool = False) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True))

    def _flat(self, ts: list[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1) for t, p in zip(ts, self.params)]
        )

    def _sampled_grad(self, target: Any, sampler: Iterator) -> torch.Tensor:
        total = None
        for _ in range(self.param_dict["samp_T"]):
            self._apply_sample(next(sampler))
            g = self._flat(self._grad(self._z_fun(target))).detach()
            total = g if total is None else total + g
        return total / self.param_dict["samp_T"]

    def _sampled_hvp(self, v: torch.Tensor, sampler: Iterator) -> torch.Tensor:
        total = None
        for _ in range(self.param_dict["samp_T"]):
            self._apply_sample(next(sampler))
            zz = next(sampler)  # a second, independent minibatch for the product (the seed's mcmc_unlearner.py)
            flat = self._flat(self._grad(self._fun(zz), create_graph=True))
            hv = self._flat(list(torch.autograd.grad(flat, self.params, grad_outputs=v, allow_unused=True)))
            total = hv.detach() if total is None else total + hv.detach()
        return total / self.param_dict["samp_T"]

    def remove(self, target: Any, sampler: Iterator) -> SolveResult:
        """Forget the batch ``target`` using ``sampler`` (an iterator over batches of the remaining data; an
        iterable such as a ``DataLoader`` is restarted at every epoch's end).

        Returns:
            The LiSSA :class:`~mcmc_unlearner.solvers.SolveResult` (``x`` is the applied shift).

        Raises:
            SolverDivergedError: the recursion diverged; parameters and sampler state are restored.
            InvalidRequestError: the removed batch is empty or not finite, or the sampler ran out (parameters and
                sampler state restored).
            ValueError: ``param_dict``'s ``iter_T`` or ``samp_T`` is not an integer >= 1, or its ``scaling`` is
                neither ``'auto'`` nor a finite number > 0, or the removed fields have different numbers of rows
                (nothing is touched).
        """
        T, iters, scaling = _checked_params(self.param_dict, "param_dict['{}']")
        batch = tuple(target) if isinstance(target, (list, tuple)) else (target,)
        tensors = tuple(t for t in batch if isinstance(t, torch.Tensor))
        check_finite_batch(tensors)
        rowed = bool(tensors) and all(t.dim() > 0 for t in tensors)
        if rowed:  # the native API's check: fields of other lengths crashed in _repeated_rows' reshape (stop 57)
            _as_batch(tensors, "the removed data")
        if tensors and tensors[0].dim() > 0 and tensors[0].shape[0] == 0:
            raise InvalidRequestError("the removed batch is empty: pass at least one data point to forget")
        repeated = _repeated_rows(tensors) if rowed else 0
        if repeated:
            warnings.warn(
                f"the removed batch holds {repeated} row(s) identical in every field to another of its rows: each row "
                "is removed as often as it is given (its influence counted that many times). If the data set holds "
                "such a row once, pass it once",
                stacklevel=2,
            )
        saved = [p.detach().clone() for p in self.params]
        opt_state = copy.deepcopy(self.optimizer.state_dict())
        gen_state = _sampler_generator_state(self.optimizer)
        # the seed's SGLD/SGHMC (and any sampler without a generator of its own) draw from torch's global RNG
        rng_state = torch.get_rng_state() if gen_state is None else None
        # the remaining data's own state (a RemovableDataset's order and position), put back on failure too: it was
        # left advanced by the minibatches the failed recursion drew (stop 43's probe)
        source = sampler
        keeps = callable(getattr(source, "state_dict", None)) and callable(getattr(source, "load_state_dict", None))
        data_state = copy.deepcopy(source.state_dict()) if keeps else None
        try:
            sampler = _Minibatches(sampler, T * (1 + 2 * iters + (60 if scaling == "auto" else 0)))
            with plain_attention():  # double backward through attention needs torch's math kernel
                G = self._sampled_grad(target, sampler)
                result = lissa(
                    lambda v: self._sampled_hvp(v, sampler),
                    G,
                    scaling=scaling,
                    iters=iters,
                    tol=0.0,
                    # sgmcmcUnlearner has no solver option: the message offered solver='cg' (stop 45's probe)
                    alternative=" (param_dict['scaling'] = 'auto'); MCMCUnlearner solves without a scaling",
                )
        except BaseException as exc:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)
            self.optimizer.load_state_dict(opt_state)
            _set_sampler_generator_state(self.optimizer, gen_state)
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            if data_state is not None:
                source.load_state_dict(data_state)
            dtypes = {t.dtype for t in tensors if t.is_floating_point()} - {self.params[0].dtype}
            if isinstance(exc, RuntimeError) and dtypes and "dtype" in str(exc).lower():
                # torch's own words named neither the data nor the fix (stop 46's probe: "addmv input tensors
                # must have the same dtype")
                raise InvalidRequestError(
                    f"{exc}: the removed batch holds {sorted(map(str, dtypes))[0]} values and the parameters are "
                    f"{self.params[0].dtype}; pass the data in the dtype the model was trained on (e.g. "
                    f"[t.to({self.params[0].dtype}) for t in target]), or cast it in _fun/_z_fun; the parameters "
                    "and sampler state were restored"
                ) from exc
            raise
        with torch.no_grad():
            offset = 0
            for p in self.params:
                k = p.numel()
                p.add_(result.x[offset : offset + k].view_as(p))
                offset += k
        # tol=0 runs every round, as the paper's code does; "converged" then says whether the stochastic
        # recursion settled (its last round changed the iterate by at most 1e-4 relative), not "never"
        result.converged = bool(result.residual <= SEED_API_TOL)
        self.last_result = result
        return result
