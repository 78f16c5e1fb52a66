"""Bayesian models usable with :class:`mcmc_unlearner.MCMCUnlearner`.

A model is an ``nn.Module`` with two methods:

* ``log_prior() -> Tensor``: scalar log prior density of the current parameters (up to a constant);
* ``nll(batch) -> Tensor``: per-datum negative log-likelihood ``h(θ, z)``, shape ``[B]``.

The minibatch energy is then ``F(θ, B; n) = -log_prior() + (n / |B|) · Σ_{z∈B} nll(z)``.
Batches are tuples of tensors whose first dimension indexes the data, e.g. ``(x, y)``.
Both methods must be pure functions of the parameters (no in-place updates of parameters, no ``.item()``)
so that ``torch.func`` transforms (``grad``, ``jvp``, ``vmap``) apply.
"""
