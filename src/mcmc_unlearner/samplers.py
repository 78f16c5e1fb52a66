"""Stochastic-gradient MCMC samplers as ``torch.optim.Optimizer`` s.

Both target ``p(θ) ∝ exp(-F(θ))`` where ``F`` is the energy whose gradient the caller puts in ``.grad``
(``loss.backward()`` before ``step()``), exactly as in the seed repository of Fu, He & Tao (ICLR 2022).
The integrators are kept apart from gradient estimation: a sampler only sees ``p.grad``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

from .data import new_pass
from .options import finite, shown_value

__all__ = ["SGHMC", "SGLD", "run_chain", "scale_lr"]


def _noise(p: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(p) * std
    return torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device) * std


class _SGMCMC(Optimizer):
    """Shared shape of the samplers: validated ``lr``, an optional noise generator, and a ``step`` that
    applies the integrator's :meth:`_update` to every parameter that has a gradient."""

    def __init__(self, params: Iterable, defaults: dict, generator: torch.Generator | None) -> None:
        self._check_options(defaults)
        super().__init__(params, defaults)
        self.generator = generator

    def _check_options(self, group: dict) -> None:
        """``lr`` positive and finite (``alpha`` in (0, 1] for SGHMC), in the defaults and in every group."""
        name, lr = type(self).__name__, group["lr"]
        value = float(lr) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
        if isinstance(lr, bool) or not isinstance(value, (int, float)) or not (finite(value) and value > 0):
            raise ValueError(f"{name}: lr must be positive and finite, got {shown_value(lr)}")
        alpha = group.get("alpha", 1.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"{name}: alpha must lie in (0, 1], got {shown_value(alpha)}")

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, refusing options the sampler does not have (``weight_decay``, ``momentum``
        in a group were silently ignored) and checking the group's own ``lr``/``alpha``."""
        name = type(self).__name__
        extra = set(param_group) - set(self.defaults) - {"params", "param_names", "initial_lr"}
        if extra:
            raise ValueError(
                f"{name}: unknown option(s) {sorted(extra)} in a parameter group; {name} takes "
                f"{sorted(self.defaults)} (weight decay is a Gaussian prior: put it in the energy's log prior)"
            )
        self._check_options({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def set_learning_rate(self, lr: float) -> None:
        """Set every parameter group's ``lr`` (the seed repository's optimizers have this method)."""
        self._check_options({**self.defaults, "lr": lr})
        for group in self.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        """torch's ``state_dict`` plus the noise generator's state (``"generator"``, when the sampler has one of its
        own): a chain resumed from it continues bit for bit. Until stop 46 the generator was left out, and a chain
        resumed with a generator seeded afresh replayed the noise it had already drawn."""
        sd = super().state_dict()
        if self.generator is not None:
            sd["generator"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``; a ``"generator"`` entry sets the noise generator (when the sampler has one;
        copying one chain's state into another sampler keeps the other's noise: drop the entry first), and a seed
        checkpoint's SGHMC ``"velocity"`` is read as ``"momentum_buffer"`` (it was ignored, the resumed chain's
        first step drawing a fresh velocity)."""
        state_dict = dict(state_dict)
        gen = state_dict.pop("generator", None)
        state = state_dict.get("state")
        if isinstance(state, dict) and any(isinstance(v, dict) and "velocity" in v for v in state.values()):
            state_dict["state"] = {
                k: (
                    {("momentum_buffer" if key == "velocity" else key): val for key, val in v.items()}
                    if isinstance(v, dict) and "velocity" in v and "momentum_buffer" not in v
                    else v
                )
                for k, v in state.items()
            }
        super().load_state_dict(state_dict)
        if gen is not None and self.generator is not None:
            self.generator.set_state(gen)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Take one step using the gradients stored in ``p.grad`` (``closure`` re-evaluates the energy)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss


class SGLD(_SGMCMC):
    """Stochastic-gradient Langevin dynamics (Welling & Teh, 2011).

    Update: ``θ ← θ − lr·∇F(θ) + N(0, 2·lr)``. Its stationary law is ``exp(−F)`` as ``lr → 0``.

    Args:
        params: Parameters (or parameter groups) to sample.
        lr: Step size.
        generator: Optional ``torch.Generator`` for the injected noise (global RNG when ``None``).
    """

    def __init__(self, params: Iterable, lr: float, generator: torch.Generator | None = None) -> None:
        super().__init__(params, {"lr": lr}, generator)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr = group["lr"]
        p.add_(p.grad, alpha=-lr).add_(_noise(p, math.sqrt(2.0 * lr), self.generator))


class SGHMC(_SGMCMC):
    """Stochastic-gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin, 2014), seed parameterisation.

    On the first step the velocity is drawn ``v ~ N(0, lr)`` and added: ``θ ← θ + v``. Afterwards
    ``v ← v − lr·∇F(θ) − alpha·v + N(0, 2·alpha·lr)``, ``θ ← θ + v``. The velocity lives in
    ``state[p]["momentum_buffer"]`` and round-trips through ``state_dict``.

    Args:
        params: Parameters (or parameter groups) to sample.
        lr: Step size (``η`` in the paper).
        alpha: Friction, in ``(0, 1]``.
        generator: Optional ``torch.Generator`` for the injected noise.
    """

    def __init__(
        self, params: Iterable, lr: float, alpha: float = 0.9, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(params, {"lr": lr, "alpha": alpha}, generator)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, alpha = group["lr"], group["alpha"]
        state = self.state[p]
        if "momentum_buffer" not in state:
            v = state["momentum_buffer"] = _noise(p, math.sqrt(lr), self.generator)
        else:
            v = state["momentum_buffer"]
            v.mul_(1.0 - alpha).add_(p.grad, alpha=-lr)
            v.add_(_noise(p, math.sqrt(2.0 * alpha * lr), self.generator))
        p.add_(v)


def scale_lr(optimizer: Optimizer, factor: float) -> None:
    """Multiply every parameter group's ``lr`` by ``factor`` (used after a removal: lr ∝ 1/n)."""
    for group in optimizer.param_groups:
        group["lr"] *= factor


def _zero_grad(sampler: Optimizer) -> Callable[[], None]:
    """``sampler.zero_grad(set_to_none=False)`` (every parameter keeps a zero gradient, so a parameter a minibatch
    does not reach still gets its noise), or plain ``zero_grad()`` for a sampler whose ``zero_grad`` has no such
    keyword (a user's own class: ``run_chain`` failed with a ``TypeError``)."""
    try:
        params = inspect.signature(sampler.zero_grad).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): call it as torch's optimizers are called
        return lambda: sampler.zero_grad(set_to_none=False)
    if any(p.name == "set_to_none" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return lambda: sampler.zero_grad(set_to_none=False)
    return sampler.zero_grad


def run_chain(
    model: torch.nn.Module,
    sampler: Optimizer,
    batches: Iterable,
    energy: Callable[[torch.nn.Module, tuple, int], torch.Tensor],
    steps: int,
    n: int,
    *,
    lr_schedule: Callable[[int], float] | None = None,
    keep_every: int = 0,
    progress: str | None = None,
) -> torch.Tensor | None:
    """Run ``steps`` SG-MCMC steps of ``sampler`` on ``energy(model, batch, n)``.

    Args:
        model: Model whose parameters ``sampler`` updates.
        sampler: An SG-MCMC optimizer (:class:`SGLD`, :class:`SGHMC`, or one of the user's own with ``step()``
            and ``zero_grad()``, with or without torch's ``set_to_none`` keyword).
        batches: Endless iterator of minibatches (e.g. a :class:`~mcmc_unlearner.data.RemovableDataset`), or a
            re-iterable such as a ``DataLoader`` (restarted at each epoch's end; a ``DistributedSampler``'s epoch is
            advanced before each pass, so that it reshuffles as ``shuffle=True`` does).
        energy: Minibatch energy ``F``.
        steps: Number of steps.
        n: Data-set size the energy is scaled to.
        lr_schedule: If given, step ``t`` (0-based, counted within this call) uses ``lr = lr_schedule(t)``.
        keep_every: Keep the flat parameters every ``keep_every`` steps (0: keep nothing).
        progress: Label of a tqdm progress bar (``None``: no bar).

    Returns:
        The kept samples ``[k, D]`` (or ``None`` when ``keep_every`` is 0).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    zero_grad = _zero_grad(sampler)
    it = new_pass(batches)  # a DataLoader over a DistributedSampler: a new order per pass, as with shuffle=True
    kept: list[torch.Tensor] = []
    rng = range(steps)
    if progress is not None:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc=progress, leave=False, mininterval=0.5)
    for t in rng:
        if lr_schedule is not None:
            lr = lr_schedule(t)
            for group in sampler.param_groups:
                group["lr"] = lr
        zero_grad()
        try:
            batch = next(it)
        except StopIteration:
            if it is batches:  # a one-shot iterator: it cannot be restarted
                raise ValueError(
                    f"run_chain: the minibatch iterator ran out after {t} of {steps} steps; pass an endless source "
                    "(a RemovableDataset) or a re-iterable such as a DataLoader (restarted at each epoch's end)"
                ) from None
            it = new_pass(batches)  # a DataLoader: the next epoch
            try:
                batch = next(it)
            except StopIteration:
                raise ValueError("run_chain: the minibatch source yields no minibatches") from None
        energy(model, batch, n).backward()
        sampler.step()
        if keep_every and (t + 1) % keep_every == 0:
            kept.append(torch.cat([p.detach().reshape(-1) for p in params]))
    sampler.zero_grad()
    return torch.stack(kept) if kept else None
