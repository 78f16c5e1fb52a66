"""The deletion service: saved model folders and the ``forget`` / ``status`` / ``verify`` requests on them.

Modules, each readable and testable alone:

* :mod:`~mcmc_unlearner.service.fsio` — confined, no-follow, atomic file I/O and the folder lock;
* :mod:`~mcmc_unlearner.service.specs` — the model/data registry (the only place that knows concrete models);
* :mod:`~mcmc_unlearner.service.integrity` — HMAC keys and manifest signatures;
* :mod:`~mcmc_unlearner.service.ledger` — the hash-chained audit ledger;
* :mod:`~mcmc_unlearner.service.checkpoint` — save, snapshot/load, commit and crash recovery;
* :mod:`~mcmc_unlearner.service.requests` — request ids, id files and solver settings, checked before work;
* :mod:`~mcmc_unlearner.service.gate` — the quality gate and the refuse/accept/repair policies;
* :mod:`~mcmc_unlearner.service.deletion` — ``forget``, ``status``, ``verify``;
* :mod:`~mcmc_unlearner.service.commands` — their command-line interface.

``mcmc_unlearner.store``, ``mcmc_unlearner.ledger`` and ``mcmc_unlearner.deletion`` re-export the public names
for code written against the earlier single-module layout.
"""
