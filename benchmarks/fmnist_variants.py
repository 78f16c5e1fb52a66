"""Fashion-MNIST unlearner variants on cached chains, and each bank's first-moment residual.

``mcmc-unlearner bnn --preset paper-fmnist`` trains four chains per seed (origin and three retrains, ~10 CPU-min)
before any method runs. This script trains them once per seed (same seeds, same code, so the same chains as the
command), caches them, and then runs ``unlearn`` alone with extra ``MCMCUnlearner`` options, scored exactly as the
command scores it (kept-class predictive L1 to the retrain chains as a multiple of the retrain-pair floor, etc.);
``--method paper`` runs the command's ``paper`` method (the faithful reference procedure) instead, with its seed:

    python benchmarks/fmnist_variants.py train --seed 0 --cache /tmp/fm
    python benchmarks/fmnist_variants.py run --seed 0 --cache /tmp/fm --name default
    python benchmarks/fmnist_variants.py run --seed 0 --cache /tmp/fm --name shorten --options '{"shorten_steps": true}'
    python benchmarks/fmnist_variants.py residual --seed 0 --cache /tmp/fm default shorten
    python benchmarks/fmnist_variants.py run --seed 0 --cache /tmp/fm --name rc10 --options '{"recenter_every": 10}'
    python benchmarks/fmnist_variants.py run --seed 0 --cache /tmp/fm --name rs600 --request-size 600  # 10 requests
    python benchmarks/fmnist_variants.py run --seed 0 --cache /tmp/fm --method paper --name paper
    python benchmarks/fmnist_variants.py retrain --seed 0 --cache /tmp/fm --name retrain-timing
    python benchmarks/fmnist_variants.py residual --seed 0 --cache /tmp/fm --named-only rc10
    python benchmarks/fmnist_variants.py rownoise --seed 3 --cache /tmp/fm default
    python benchmarks/fmnist_variants.py decompose --seed 0 --cache /tmp/fm --samples 10 default

``residual`` measures the first-moment identity of each bank's posterior, ``E_θ[∇F(θ)] = 0`` (integration by
parts; ``F`` = the bank's own data: all training points for origin, the remaining ones otherwise), on every
training row, along the output layer's biases, where it reads as calibration: ``∂F/∂b_c = Σ_i (p_c(x_i) − y_ic)
+ b_c/σ²``, i.e. how many more training points the network assigns to class ``c`` than carry that label (plus the
prior's pull). A bank at equilibrium has every entry within its Monte-Carlo error of 0. Also the norm of the full
mean gradient. ``run`` records the library's first-moment corrections (``recenter_every``) from the requests'
reports (a diagnostic ``--correct-every K`` that reached into the K-FAC backend, which that option replaced, is
at commit 3734e5b). ``retrain`` re-trains the seed's first retrain chain and times it (the cost the methods are
compared with), checking that it equals the cached one. ``rownoise`` measures how noisy the correction's moment
would be on a sample of the rows (docs/fashion-mnist.md, "Six seeds"); ``decompose`` where a bank's distance to the
retrain chains lies (per class, spread, mean, the output biases' first moment; docs/fashion-mnist.md, stop 39).
One torch thread. Results append to
``CACHE/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mcmc_unlearner.bank import ParamSpec
from mcmc_unlearner.cli import build_parser
from mcmc_unlearner.experiments import bnn as B
from mcmc_unlearner.experiments import evaluation as ev
from mcmc_unlearner.image_data import missing_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: _benchargs
import _benchargs as A


def _experiment(
    seed: int,
    data_dir: str,
    init: torch.Tensor | None,
    options: dict,
    request_size: int = 64,
    download: bool = False,
) -> B._Experiment:
    argv = ["bnn", "--preset", "paper-fmnist", "--data-dir", data_dir, "--seed", str(seed), "--quiet"]
    argv += ["--request-size", str(request_size)] + (["--download"] if download else [])
    cfg = B._resolve(B.config_from_args(build_parser().parse_args(argv)))
    cfg.unlearner_kwargs = dict(options)
    if init is not None:  # the cached pre-trained initial weights (the same the command computes)
        B._Experiment._initial_weights = lambda self: init
    return B._Experiment(cfg)


def _train(args: argparse.Namespace) -> None:
    ex = _experiment(args.seed, args.data_dir, None, {}, download=args.download)
    s = ex.cfg.seed * 1000
    names = B._retrain_names(ex.cfg.retrain_chains)
    origin = ex.train(torch.arange(ex.n_full), s + 1, "origin")
    seeds = [s + 2, s + 3, *(s + 10 + i for i in range(ex.cfg.retrain_chains - 2))]  # as the command's _run
    banks = {nm: ex.train(ex.kept_ids, sd, nm)["bank"] for nm, sd in zip(names, seeds)}
    path = args.cache / f"chains-s{args.seed}.pt"
    torch.save(
        {
            "init": ex.init,
            "origin_model": origin["model"].state_dict(),
            "origin_sampler": origin["sampler"].state_dict(),
            "origin_bank": origin["bank"],
            "banks": banks,
        },
        path,
    )
    print(f"saved {path}")


def _load(args: argparse.Namespace, options: dict) -> tuple[B._Experiment, dict, dict]:
    saved = torch.load(args.cache / f"chains-s{args.seed}.pt", weights_only=True)
    ex = _experiment(args.seed, args.data_dir, saved["init"], options, args.request_size, args.download)
    model = ex.new_model()
    model.load_state_dict(saved["origin_model"])
    sampler = B._make_sampler(ex.cfg, model, 1.0, ex.cfg.seed * 1000 + 1)
    sampler.load_state_dict(saved["origin_sampler"])
    return ex, {"model": model, "sampler": sampler, "bank": saved["origin_bank"]}, saved


def _retrain(args: argparse.Namespace) -> None:
    """One retrain chain of the seed (the command's ``retrain``: same initial weights, data and chain seed),
    re-trained and timed in this process: the cost every unlearning method is compared with. The bank must equal
    the cached one (same code, same machine type), which the row records."""
    ex, _, saved = _load(args, {})
    out = ex.train(ex.kept_ids, ex.cfg.seed * 1000 + 2, "retrain")
    row = {
        "name": args.name,
        "seed": args.seed,
        "retrain_cpu_seconds": out["cpu_seconds"],
        "retrain_wall_seconds": out["seconds"],
        "bit_identical_to_cache": bool(torch.equal(out["bank"], saved["banks"]["retrain"])),
    }
    print(json.dumps(row), flush=True)
    with open(args.cache / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _energy_gradients(
    ex: B._Experiment, model: torch.nn.Module, thetas: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """``∇F(θ)`` on the training rows ``ids`` (all of them, in chunks) at each of ``thetas``: ``[len(thetas), D]``."""
    x, y = ex.x_train[ids], ex.y_train[ids]
    grads = []
    for theta in thetas:
        ParamSpec.assign(model, theta)
        model.zero_grad()
        energy = -model.log_prior()
        for i in range(0, len(ids), 4000):
            energy = energy + model.nll((x[i : i + 4000], y[i : i + 4000])).sum()
        energy.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(grads)


def _run(args: argparse.Namespace) -> None:
    options = json.loads(args.options)
    ex, origin, saved = _load(args, options)
    names = B._retrain_names(ex.cfg.retrain_chains)
    progress = B._Progress(ex, saved["banks"]["retrain"])
    c0 = time.process_time()
    if args.method == "paper":  # the faithful reference procedure, the command's seed for it
        res = B._run_paper(ex, origin, progress, ex.cfg.seed * 1000 + 6)
    else:
        res, _ = B._run_unlearner(ex, origin, progress, ex.cfg.seed * 1000 + 4)
    cpu = time.process_time() - c0
    results = {
        nm: B._Result(bank=b, last=b[-1], info={"seconds": 0.0, "cpu_seconds": 0.0}) for nm, b in saved["banks"].items()
    }
    results["unlearn"] = res
    methods, floor, _ = B._evaluate(ex, results, names)
    u = methods["unlearn"]
    row = {
        "name": args.name,
        "method": args.method,
        "seed": args.seed,
        "options": options,
        "request_size": args.request_size,
        "requests": len(ex.requests),
        "l1_x_floor": u["pred_diff"]["test_kept"] / floor["pred_diff"]["test_kept"],
        "error_removed": u["error"]["removed"],
        "error_test_kept": u["error"]["test_kept"],
        "gap_removed": u["error_gap"]["removed"],
        "gap_test_kept": u["error_gap"]["test_kept"],
        "auc_removed": u["mia"]["auc_removed"],
        "cpu_seconds_requests": res.info["cpu_seconds"],
        "cpu_seconds_with_progress": cpu,
        "refused": res.info["refused"],
        "progress_l1": [(p["removed"], round(p["pred_diff_test_kept"], 4)) for p in progress.points[args.method]],
        "recenter": [  # the library's first-moment corrections (recenter_every), from the requests' reports
            {
                "request": i,
                "status": r["info"]["recenter"],
                **{k[9:]: v for k, v in r["info"].items() if k[:9] == "recenter_"},
            }
            for i, r in enumerate(res.info.get("requests", []))
            if "recenter_deviation" in r.get("info", {})
        ],
    }
    print(json.dumps(row), flush=True)
    with open(args.cache / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    torch.save(res.bank, args.cache / f"bank-s{args.seed}-{args.name}.pt")


def _residual(args: argparse.Namespace) -> None:
    ex, origin, saved = _load(args, {})
    banks = {}
    if not args.named_only:
        banks["origin"] = (origin["bank"], torch.arange(ex.n_full))
        banks.update({k: (v, ex.kept_ids) for k, v in saved["banks"].items()})
    for nm in args.names:
        banks[nm] = (torch.load(args.cache / f"bank-s{args.seed}-{nm}.pt", weights_only=True), ex.kept_ids)
    model = ex.new_model()
    n_bias = ex.data.n_classes
    for nm, (bank, ids) in banks.items():
        g = _energy_gradients(ex, model, B._thin_to(bank, args.samples), ids).double()
        bias = g[:, -n_bias:]  # the output layer's bias is the last parameter
        mean, se = bias.mean(0), bias.std(0) / g.shape[0] ** 0.5
        row = {
            "seed": args.seed,
            "bank": nm,
            "bias_residual": [round(float(v), 1) for v in mean],
            "bias_residual_stderr": [round(float(v), 1) for v in se],
            "bias_residual_l1": float(mean.abs().sum()),
            "mean_gradient_norm": float(g.mean(0).norm()),
            "mean_gradient_norm_stderr": float((g.var(0).sum() / g.shape[0]).sqrt()),
            "samples": g.shape[0],
        }
        print(json.dumps(row), flush=True)
        with open(args.cache / "residuals.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _rownoise(args: argparse.Namespace) -> None:
    """How noisy the correction's paired moment difference would be on a sample of the remaining rows.

    ``Σ_rows [∇h(θ'_s, z) − ∇h(θ⁰_s, z)]`` for the named bank ``θ'`` and the origin bank ``θ⁰`` at stored sample
    ``s = 0`` (the correction's paired sample), in chunks of 1,000 shuffled remaining rows; the standard deviation of
    the estimate scaled up from ``k`` chunks follows from the chunks' spread (sampling without replacement).
    """
    ex, _, saved = _load(args, {})
    (name,) = args.names
    moved = torch.load(args.cache / f"bank-s{args.seed}-{name}.pt", weights_only=True)[0]
    orig = saved["origin_bank"][0]
    model = ex.new_model()
    ids = ex.kept_ids[torch.randperm(len(ex.kept_ids), generator=torch.Generator().manual_seed(args.seed))]
    chunk = 1000

    def grad_sum(theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ParamSpec.assign(model, theta)
        model.zero_grad()
        model.nll((ex.x_train[idx], ex.y_train[idx])).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    sums = torch.stack(
        [
            grad_sum(moved, ids[i : i + chunk]) - grad_sum(orig, ids[i : i + chunk])
            for i in range(0, len(ids) - chunk + 1, chunk)
        ]
    )
    N = sums.shape[0]
    var = float(((sums - sums.mean(0)) ** 2).sum() / (N - 1))  # trace of one chunk sum's covariance
    row = {"seed": args.seed, "bank": name, "rows": N * chunk, "paired_difference_norm": float(sums.sum(0).norm())}
    for k in (4, 8, 16):
        row[f"sd_from_{k * chunk}_rows"] = (N**2 / k * var * (1 - k / N)) ** 0.5
    print(json.dumps(row), flush=True)


def bias_moment(
    model: torch.nn.Module,
    thetas: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    bias: slice,
    prior_std: float,
    chunk: int = 2000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bank averages of ``∂F/∂b = Σ_i (p(x_i) − e_{y_i}) + b/σ²`` along the output layer's biases ``b`` (the
    entries ``bias`` of each stored sample in ``thetas``) for a softmax classifier with prior ``N(0, σ²)``, and of
    its exact Hessian ``Σ_i (diag p_i − p_i p_iᵀ) + I/σ²``, from forward passes alone; float64."""
    k = bias.stop - bias.start
    r, h = torch.zeros(k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
    with torch.no_grad():
        for theta in thetas:
            ParamSpec.assign(model, theta)
            for i in range(0, len(x), chunk):
                p = torch.softmax(model(x[i : i + chunk]), -1).double()
                r += p.sum(0) - torch.bincount(y[i : i + chunk], minlength=k).double()
                h += torch.diag(p.sum(0)) - p.T @ p
            r += theta[bias].double() / prior_std**2
            h += torch.eye(k, dtype=torch.float64) / prior_std**2
    return r / len(thetas), h / len(thetas)


def _decompose(args: argparse.Namespace) -> None:
    """Where a saved bank's kept-class predictive distance to the retrain chains lies (docs/fashion-mnist.md, stop 39).

    On the kept-class test points: the distance's share per class (mean over retrain chains of the mean
    ``|p_c − q_c|``; the per-class shares add up to the mean over chains, where the reported distance takes the
    median) for the bank, the origin chain and the retrain pairs; the bank's signed class bias against the pooled
    retrain chains; the distance (× the retrain-pair floor, as reported) with the bank's spread about its mean
    scaled by 0.9 and 1.1, and with its deviations placed on another retrain chain's mean (what a perfect mean would
    give); with the removed class's probability renormalised away or replaced by the retrain chains' mean (stop 40);
    and with one exact Newton step along the output layer's biases that restores the origin's first moment
    there (``E_θ'[∂F(θ', S∖S')/∂b] = E_θ⁰[∂F(θ⁰, S)/∂b]``, bank averages over ``--samples`` stored samples, forward
    passes only), the component along the removed rows' own bias gradient left out.
    """
    ex, origin, saved = _load(args, {})
    (name,) = args.names
    bank = torch.load(args.cache / f"bank-s{args.seed}-{name}.pt", weights_only=True)
    model = ex.new_model()
    model.eval()
    chains = [saved["banks"][nm] for nm in B._retrain_names(ex.cfg.retrain_chains)]

    def predicted(b: torch.Tensor) -> dict[str, torch.Tensor]:
        return ex.predict(B._thin_to(b, ex.cfg.eval_samples))

    def kept(b: torch.Tensor) -> torch.Tensor:
        return predicted(b)["test_kept"]

    full_refs = [predicted(c) for c in chains]  # every evaluation set once (the own-label probability below)
    refs = [p["test_kept"] for p in full_refs]
    pairs = [(i, j) for i in range(len(refs)) for j in range(i + 1, len(refs))]
    floor = statistics.median(ev.pred_l1(refs[i], refs[j]) for i, j in pairs)

    def x_floor(p: torch.Tensor) -> float:
        return statistics.median(ev.pred_l1(r, p) for r in refs) / floor

    def share(p: torch.Tensor, qs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([(p - q).abs().mean(0) for q in qs]).mean(0)

    full_bank = predicted(bank)
    p_bank, p_origin = full_bank["test_kept"], kept(origin["bank"])
    pair_share = torch.stack([(refs[i] - refs[j]).abs().mean(0) for i, j in pairs]).mean(0)
    row: dict = {"seed": args.seed, "bank": name, "floor": floor, "l1_x_floor": x_floor(p_bank)}
    row["class_share"] = {
        "bank": [round(float(v), 4) for v in share(p_bank, refs)],
        "origin": [round(float(v), 4) for v in share(p_origin, refs)],
        "retrain_pairs": [round(float(v), 4) for v in pair_share],
    }
    row["class_bias"] = [round(float(v), 4) for v in (p_bank - torch.stack(refs).mean(0)).mean(0)]
    mean = bank.mean(0, keepdim=True)
    row["spread_scaled"] = {str(c): x_floor(kept(mean + c * (bank - mean))) for c in (0.9, 1.1)}
    # the bank's deviations on another retrain chain's mean, scored against every chain but that one
    on_mean = []
    for k in range(len(chains)):
        j = (k + 1) % len(chains)
        moved = kept(chains[j].mean(0, keepdim=True) + (bank - mean))
        on_mean.append(ev.pred_l1(refs[k], moved) / floor)
    row["deviations_on_a_retrain_mean"] = statistics.median(on_mean)
    # the removed class's probability taken away (renormalised) or replaced by the retrain chains' mean (the rest
    # rescaled): how much of a bank's distance is the removed class's own probability (an oracle: the replaced
    # probability comes from the chains it is then scored against)
    c, ref_mean = int(ex.cfg.remove_class), torch.stack(refs).mean(0)

    def renormalised(p: torch.Tensor) -> torch.Tensor:
        q = p.clone()
        q[:, c] = 0
        return q / q.sum(1, keepdim=True)

    def retrain_class_prob(p: torch.Tensor) -> torch.Tensor:
        q = p * ((1 - ref_mean[:, c]) / (1 - p[:, c])).unsqueeze(1)
        q[:, c] = ref_mean[:, c]
        return q

    def own_label(p: dict[str, torch.Tensor]) -> float:  # mean probability of the removed class on its training rows
        return float(p["removed"][:, c].mean())

    row["own_label_probability"] = {"bank": own_label(full_bank), "retrain_chains": [own_label(p) for p in full_refs]}
    row["removed_class_probability"] = {
        "origin_renormalised": x_floor(renormalised(p_origin)),
        "origin_with_retrain_mean": x_floor(retrain_class_prob(p_origin)),
        "bank_renormalised": x_floor(renormalised(p_bank)),
        "bank_with_retrain_mean": x_floor(retrain_class_prob(p_bank)),
    }
    n_bias = list(model.parameters())[-1].numel()  # the output layer's bias is the last parameter
    bias = slice(ex.dim - n_bias, ex.dim)
    draws = B._thin_to(bank, args.samples)
    at = torch.linspace(0, bank.shape[0] - 1, draws.shape[0]).round().long()
    sd, ob = ex.cfg.prior_std, origin["bank"][at]
    r_bank, h_bank = bias_moment(model, draws, ex.x_train[ex.kept_ids], ex.y_train[ex.kept_ids], bias, sd)
    r_origin, _ = bias_moment(model, ob, ex.x_train, ex.y_train, bias, sd)
    g_removed, _ = bias_moment(model, ob, ex.x_train[ex.removed_ids], ex.y_train[ex.removed_ids], bias, sd)
    g_removed -= ob[:, bias].double().mean(0) / sd**2  # the removed rows' part alone
    u = g_removed / g_removed.norm()
    d = r_bank - r_origin
    step = -torch.linalg.solve(h_bank, d - (u @ d) * u)
    fixed = bank.clone()
    fixed[:, bias] += step.to(bank.dtype)
    p_fixed = ex.predict(B._thin_to(fixed, ex.cfg.eval_samples))
    row["bias_residual"] = {
        "bank_remaining_rows": [round(float(v), 1) for v in r_bank],
        "origin_all_rows": [round(float(v), 1) for v in r_origin],
    }
    row["bias_step"] = [round(float(v), 3) for v in step]
    row["bias_step_l1_x_floor"] = x_floor(p_fixed["test_kept"])
    row["bias_step_removed_error"] = ev.error_rates(p_fixed, ex.labels)["removed"]
    print(json.dumps(row), flush=True)
    with open(args.cache / "decompose.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any work, what would fail later: Fashion-MNIST's files absent from ``--data-dir`` (without
    ``--download``), a command other than ``train`` without the seed's cached chains, ``residual``/``rownoise``
    banks that were never saved, ``rownoise`` without exactly one name, a cache that is no folder."""
    _check_cache(ap, args)
    problem = None if args.download else missing_dataset("fashion-mnist", args.data_dir)
    if problem is not None:
        ap.error(f"argument --data-dir: {problem}")


def _check_cache(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.cache.exists() and not args.cache.is_dir():
        ap.error(f"argument --cache: {str(args.cache)!r} is not a folder")
    if args.command == "train":
        return
    chains = args.cache / f"chains-s{args.seed}.pt"
    if not chains.is_file():
        ap.error(
            f"argument --cache: no cached chains for --seed {args.seed} ({chains} is missing); "
            f"run `train --seed {args.seed} --cache {args.cache}` first"
        )
    if args.command in ("rownoise", "decompose") and len(args.names) != 1:
        ap.error(f"{args.command} takes exactly one saved bank name, got {len(args.names)}")
    if args.command not in ("residual", "rownoise", "decompose"):
        return
    missing = [nm for nm in args.names if not (args.cache / f"bank-s{args.seed}-{nm}.pt").is_file()]
    if missing:
        ap.error(
            f"names: no saved bank(s) {', '.join(missing)} for --seed {args.seed} in {args.cache} "
            "(`run --name NAME` saves one)"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["train", "retrain", "run", "residual", "rownoise", "decompose"])
    ap.add_argument(
        "names", nargs="*", help="residual, rownoise and decompose (one): saved unlearned banks (run --name) to measure"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("runs/fmnist-variants"))
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST's IDX files")
    ap.add_argument("--download", action="store_true", help="fetch missing files into --data-dir (torchvision)")
    ap.add_argument("--name", default="default", help="run, retrain: the row's name")
    ap.add_argument("--options", type=A.json_object_text, default="{}", help="run: JSON dict of MCMCUnlearner options")
    ap.add_argument(
        "--method",
        choices=["unlearn", "paper"],
        default="unlearn",
        help="run: the library's unlearner (with --options) or the paper's procedure (the command's `paper`)",
    )
    ap.add_argument(
        "--samples", type=A.positive_int, default=20, help="residual, decompose: evenly thinned samples per bank"
    )
    ap.add_argument(
        "--request-size",
        type=A.positive_int,
        default=64,
        help="run: rows per deletion request (the paper's 64; 6000 removes the class in one request)",
    )
    ap.add_argument("--named-only", action="store_true", help="residual: only the named banks (not origin, retrains)")
    ap.add_argument("--threads", type=A.positive_int, default=1)
    args = ap.parse_intermixed_args(argv)
    _check(ap, args)
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    commands = {
        "train": _train,
        "retrain": _retrain,
        "run": _run,
        "residual": _residual,
        "rownoise": _rownoise,
        "decompose": _decompose,
    }
    commands[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
