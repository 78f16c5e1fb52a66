"""Deletion requests: exactly-once application, deterministic replays, and every bad input refused unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import save_gmm, tiny_gmm
from mcmc_unlearner import InvalidRequestError, RemovableDataset
from mcmc_unlearner.cli import main
from mcmc_unlearner.curvature import ParamSpec
from mcmc_unlearner.deletion import forget, parse_ids, status, verify
from mcmc_unlearner.store import MANIFEST_NAME, StoreError, load_model

N = 200


def tiny(seed: int = 0, refresh_every: int = 1):
    """A short SGHMC chain on 200 GMM points with a 20-sample bank."""
    return tiny_gmm(seed, refresh_every=refresh_every)


def save(path: Path, objs, data_spec=None) -> Path:
    return save_gmm(path, objs, data_spec)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return save(tmp_path_factory.mktemp("deletion") / "m", tiny())


@pytest.fixture
def store(template, tmp_path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(template, dst)
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes (the lock file aside)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def write_ids(tmp_path: Path, text: str, name: str = "ids.txt") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------ parsing
def test_parse_ids_formats():
    assert parse_ids("1 2\n3,4 , 5  # comment\n# whole-line comment\n6") == [1, 2, 3, 4, 5, 6]
    assert parse_ids("[7, 8, 9]") == [7, 8, 9]
    assert parse_ids('{"ids": [10]}') == [10]
    assert parse_ids("007 8") == [7, 8]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("  \n# only a comment\n", "empty"),
        ("1 2.5", "not an id"),
        ("1 abc", "not an id"),
        ("-3", "not an id"),
        ('{"ids": [10], "reason": "GDPR art. 17"}', "unknown key"),
        ("[1, 2.0]", "not an integer"),
        ("[1, true]", "not an integer"),
        ('["1"]', "not an integer"),
        ("[1, 2", "not valid JSON"),
        ('{"rows": [1]}', '"ids"'),
        ('{"ids": 3}', "JSON list"),
    ],
)
def test_parse_ids_refuses_malformed(text, match):
    with pytest.raises(InvalidRequestError, match=match):
        parse_ids(text)


# ------------------------------------------------------------------ happy path
def test_forget_status_verify_flow(store, tmp_path, capsys):
    assert main(["forget", "--model", str(store), "--ids", write_ids(tmp_path, "3\n14\n15")]) == 0
    out = capsys.readouterr().out
    assert "applied request sha256:" in out and "197 remain" in out
    st = status(store)
    assert st["n_remaining"] == N - 3 and st["removed_ids"] == [3, 14, 15] and st["requests_applied"] == 1
    assert st["bank_size"] == 20 and st["params_finite"] and st["state_hash_ok"] and st["ledger_matches_state"]
    assert st["last_residual"] < 1e-4
    assert main(["status", "--model", str(store)]) == 0
    assert "197 remaining, 3 removed of 200" in capsys.readouterr().out
    assert main(["verify", "--model", str(store)]) == 0
    assert capsys.readouterr().out.startswith("OK: 1 request(s)")
    # rerunning the same file: already applied, exit 0, nothing changes
    before = snapshot(store)
    assert main(["forget", "--model", str(store), "--ids", write_ids(tmp_path, "[15, 3, 14]", "again.json")]) == 0
    assert "already applied" in capsys.readouterr().out
    assert snapshot(store) == before
    # the ledger records what happened
    lm = load_model(store)
    (e,) = lm.requests
    assert e["ids"] == [3, 14, 15] and e["solver"] == "exact" and e["before_sha256"] == lm.entries[0]["after_sha256"]
    assert e["after_sha256"] == lm.model_sha256 and e["software_version"]
    # only the current state file is kept
    assert sorted(p.name for p in store.glob("state-*")) == ["state-000001.safetensors"]


def test_store_sequence_equals_in_memory_sequence(tmp_path):
    """Three requests through save/load/commit cycles give exactly the in-memory result (refresh_every=2:
    the cached Hessian, generators and step size all survive the round trips)."""
    requests = [[1, 2, 3], [50, 60], [100, 101, 102, 103]]
    m = save(tmp_path / "m", tiny(refresh_every=2))
    for r in requests:
        assert forget(m, r).applied
    model, sampler, data, un = tiny(refresh_every=2)
    for r in requests:
        un.forget(r, data)
    lm = load_model(m)
    assert torch.equal(ParamSpec.flatten_module(lm.model), ParamSpec.flatten_module(model))
    assert torch.equal(lm.unlearner.bank, un.bank)
    assert lm.sampler.param_groups[0]["lr"] == sampler.param_groups[0]["lr"]
    assert [e["info"]["hessian_reused"] for e in lm.requests] == [False, True, False]
    assert verify(m).ok


def test_replays_are_bit_identical(template, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(template, a)
    shutil.copytree(template, b)
    for m in (a, b):
        forget(m, [5, 6, 7, 8], overrides={"curvature_draws": 6})
        forget(m, [20, 21])
    assert (a / "state-000002.safetensors").read_bytes() == (b / "state-000002.safetensors").read_bytes()
    assert load_model(a).model_sha256 == load_model(b).model_sha256


def test_explicit_request_id(store):
    out = forget(store, [9, 10], request_id="ticket-1")
    assert out.applied and out.request_id == "ticket-1"
    assert not forget(store, [10, 9], request_id="ticket-1").applied
    before = snapshot(store)
    with pytest.raises(InvalidRequestError, match="already used"):
        forget(store, [11], request_id="ticket-1")
    assert snapshot(store) == before


# ------------------------------------------------------------------ every bad input refused, state unchanged
BAD_REQUESTS = [
    ("unknown id", "5\n100000\n", "unknown id"),
    ("negative id", "-1", "not an id"),
    ("already removed", "3 4", "already removed"),
    ("duplicate in request", "8 9 8", "more than once"),
    ("empty request", "\n", "empty"),
    ("remove everything", " ".join(str(i) for i in range(N) if i != 3), "remove all"),
    ("non-integer", "1 2.5", "not an id"),
    ("garbage", "one,two", "not an id"),
    ("malformed json", "[1, 2", "not valid JSON"),
]


@pytest.mark.parametrize(("case", "text", "match"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_refused_state_unchanged(store, tmp_path, capsys, case, text, match):
    forget(store, [3])  # so that "already removed" has something removed
    before = snapshot(store)
    rc = main(["forget", "--model", str(store), "--ids", write_ids(tmp_path, text)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("mcmc-unlearner forget: error:") and match in err
    assert snapshot(store) == before


def _run_refused(args: list[str], capsys, match: str) -> None:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and match in err, err


def test_missing_model_folder_and_ids_file(tmp_path, store, capsys):
    ids = write_ids(tmp_path, "1")
    _run_refused(["forget", "--model", str(tmp_path / "nope"), "--ids", ids], capsys, "not found")
    _run_refused(["status", "--model", str(tmp_path / "nope")], capsys, "not found")
    _run_refused(["forget", "--model", str(store), "--ids", str(tmp_path / "none.txt")], capsys, "ids file")


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "ledger"])
def test_damaged_folder_refused_unchanged(store, tmp_path, capsys, damage):
    state = store / "state-000000.safetensors"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 2])
    elif damage == "flip":
        raw = bytearray(state.read_bytes())
        raw[-5] ^= 0x40
        state.write_bytes(bytes(raw))
    elif damage == "manifest":
        (store / MANIFEST_NAME).write_text((store / MANIFEST_NAME).read_text()[:-40])
    else:
        (store / "ledger.jsonl").write_text(
            (store / "ledger.jsonl").read_text().replace('"n_total":200', '"n_total":201')
        )
    before = snapshot(store)
    _run_refused(["forget", "--model", str(store), "--ids", write_ids(tmp_path, "1 2")], capsys, "error:")
    assert snapshot(store) == before
    assert main(["verify", "--model", str(store)]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_diverging_solver_refused_unchanged(store, tmp_path, capsys):
    before = snapshot(store)
    args = ["forget", "--model", str(store), "--ids", write_ids(tmp_path, "1 2"), "--solver", "lissa"]
    _run_refused([*args, "--scaling", "1e6"], capsys, "lissa")
    assert snapshot(store) == before
    _run_refused([*args, "--scaling", "abc"], capsys, "--scaling")
    _run_refused([*args, "--bank-shift", "affine"], capsys, "affine")
    assert snapshot(store) == before
    # LiSSA at 200 rounds reaches a relative residual of about 1e-2: refused at tol 1e-3 (exit 4, nothing written),
    # committed at tol 2e-2
    assert main([*args, "--scaling", "auto", "--iter-T", "200", "--tol", "1e-3"]) == 4
    assert "residual" in capsys.readouterr().err and snapshot(store) == before
    assert main([*args, "--scaling", "auto", "--iter-T", "200", "--tol", "2e-2"]) == 0


def test_invalid_override_combination_is_spelled_one_way(store, tmp_path, capsys):
    """Was: ``forget --solver lissa --bank-shift affine`` answered "configuration override {'solver': 'lissa',
    '--bank-shift': 'affine'} is invalid: --bank-shift affine needs --solver exact ...", a dict half in keywords and
    half in flags. The command line names every setting by its flag, Python by its keyword."""
    before = snapshot(store)
    ids = write_ids(tmp_path, "1 2")
    assert main(["forget", "--model", str(store), "--ids", ids, "--solver", "lissa", "--bank-shift", "affine"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "configuration override --solver lissa, --bank-shift affine is invalid: --bank-shift affine" in err, err
    assert "'solver'" not in err and "bank_shift" not in err and "'--" not in err, err
    with pytest.raises(InvalidRequestError) as e:
        forget(store, [1, 2], overrides={"solver": "lissa", "bank_shift": "affine"})
    said = str(e.value)
    assert "configuration override solver='lissa', bank_shift='affine' is invalid: bank_shift='affine'" in said, said
    assert "--" not in said, said
    assert snapshot(store) == before


def test_non_finite_data_refused_unchanged(tmp_path, capsys, monkeypatch):
    """Requests on data with NaN rows are refused with nothing changed. Such a folder can take no request at all, one
    for the NaN rows included, and verify called it OK (stop 59's probe): save_model now refuses the data, and
    verify names the rows of a folder saved before."""
    model, sampler, data, un = tiny()
    x = data.tensors[0].clone()
    x[5, 1] = float("nan")
    x[6, 0] = float("inf")
    bad = RemovableDataset(x, data.tensors[1], batch_size=32, seed=1)
    said = r"cannot save: the remaining training data hold NaN or infinite values in the rows with id\(s\) \[5, 6\]: "
    with pytest.raises(StoreError, match=said + r"every deletion request .* nothing was saved: fix those rows"):
        save(tmp_path / "refused", (model, sampler, bad, un), data_spec={"kind": "tensors"})
    assert not (tmp_path / "refused").exists()
    with monkeypatch.context() as mp:  # a folder saved before the check
        mp.setattr(RemovableDataset, "nonfinite_ids", lambda self: torch.zeros(0, dtype=torch.int64))
        m = save(tmp_path / "m", (model, sampler, bad, un), data_spec={"kind": "tensors"})
    before = snapshot(m)
    _run_refused(["forget", "--model", str(m), "--ids", write_ids(tmp_path, "4 5")], capsys, "NaN or infinite")
    _run_refused(["forget", "--model", str(m), "--ids", write_ids(tmp_path, "6")], capsys, "NaN or infinite")
    assert snapshot(m) == before
    problems = verify(m).problems  # (it said OK)
    assert len(problems) == 1 and "NaN or infinite values in the rows with id(s) [5, 6]" in problems[0], problems
    assert snapshot(m) == before
    assert json.loads((m / MANIFEST_NAME).read_text())["data_spec"] == {"kind": "tensors"}


def test_request_hash_is_order_free(store):
    a = forget(store, [12, 11]).request_id
    assert a == "sha256:" + hashlib.sha256(b"[11,12]").hexdigest()


def test_status_names_the_options_an_older_folder_takes_at_this_versions_defaults(
    tmp_path, capsys, monkeypatch
) -> None:
    """A folder keeps the configuration it was saved with; options added since take the current defaults, so an
    upgraded folder ran a configuration neither version would use (a folder saved before ``shorten_steps`` existed:
    its request 3 shifted 0.0117 against the old code's 0.0165), and nothing said so. ``status`` now shows the
    configuration requests run with and names the defaulted options."""
    from mcmc_unlearner.service import state
    from mcmc_unlearner.service.checkpoint import load_model

    m = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    st = status(m)
    loaded = load_model(m)
    assert st["defaulted_options"] == {} and st["unlearner_config"] == loaded.unlearner.config()
    saved = dict(loaded.manifest["unlearner"])
    older = {k: v for k, v in saved.items() if k != "shorten_steps"} | {"check_draws": None}
    got = state.defaulted_options(older, loaded.unlearner)
    current = loaded.unlearner.config()
    assert got == {"shorten_steps": current["shorten_steps"], "check_draws": current["check_draws"]}
    assert main(["status", "--model", str(m)]) == 0
    assert "defaults:" not in capsys.readouterr().out  # nothing defaulted in a folder of this version
    import mcmc_unlearner.service.deletion as deletion

    real = deletion.status
    monkeypatch.setattr(deletion, "status", lambda *a, **k: real(*a, **k) | {"defaulted_options": got})
    assert main(["status", "--model", str(m)]) == 0
    out = capsys.readouterr().out
    line = next(t for t in out.splitlines() if t.startswith("defaults:"))
    assert "this version's defaults apply:" in line and "shorten_steps=True" in line and "check_draws=8" in line


def test_an_already_applied_request_says_what_debris_it_removed(store, tmp_path, capsys) -> None:
    """Resending a request whose first run was killed after its commit point deleted the old state file it left
    behind and said "nothing changed": the message now names the files removed (the model itself is unchanged)."""
    ids = write_ids(tmp_path, "3\n14")
    assert main(["forget", "--model", str(store), "--ids", ids]) == 0
    capsys.readouterr()
    debris = Path(store) / "state-000099.safetensors"  # an old state file a killed request left
    debris.write_bytes(b"left by an interrupted request")
    assert main(["forget", "--model", str(store), "--ids", ids]) == 0
    out = capsys.readouterr().out
    assert "already applied" in out and "nothing changed" not in out
    assert "removed 1 file(s) an interrupted request left: state-000099.safetensors" in out and not debris.exists()
    assert main(["forget", "--model", str(store), "--ids", ids]) == 0
    assert "nothing changed" in capsys.readouterr().out
