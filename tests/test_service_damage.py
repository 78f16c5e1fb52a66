"""Damaged model folders and request edge cases (probe 32, B5/B6).

* A folder whose ``manifest.json`` is gone while its ledger and state files are there is damaged, not empty:
  ``verify`` exits 1 listing the problem, ``status``/``forget`` refuse (exit 2) saying so, and ``save_model``
  refuses to save into it instead of deleting the ledger of applied requests. Every refusal leaves every file of
  the folder byte-identical (:func:`conftest.folder_state`).
* ``--on-failure repair`` takes its bank from the run's second half only, so it needs at least twice the bank's
  size in steps.
* Ids files may start with a UTF-8 byte-order mark; a repeated id is named before a reused request id; the
  ledger numbering of ``forget`` and ``verify --expect-head`` agree; a 16 MiB request of one repeated id is
  refused before a Python object per id exists.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import folder_state, save_gmm, tiny_gmm
from mcmc_unlearner.cli import main
from mcmc_unlearner.errors import InvalidRequestError, UnlearningError
from mcmc_unlearner.samplers import run_chain
from mcmc_unlearner.service import fsio
from mcmc_unlearner.service.checkpoint import load_model
from mcmc_unlearner.service.deletion import forget, status, verify
from mcmc_unlearner.service.fsio import StoreError
from mcmc_unlearner.service.gate import min_repair_steps, repair_chain
from mcmc_unlearner.service.requests import parse_ids, read_ids
from mcmc_unlearner.store import DamagedFolderError


@pytest.fixture(scope="module")
def applied(tmp_path_factory) -> Path:
    """A saved model with one applied request (T1: ids 4, 17): ledger 2 lines, state-000001."""
    m = save_gmm(tmp_path_factory.mktemp("damage") / "m", tiny_gmm(bank=10))
    forget(m, [4, 17], request_id="T1")
    return m


@pytest.fixture
def lost(applied, tmp_path) -> Path:
    """``applied`` with its manifest.json deleted."""
    m = tmp_path / "m"
    shutil.copytree(applied, m)
    os.remove(m / "manifest.json")
    assert sorted(os.listdir(m)) == ["ledger.jsonl", "state-000001.safetensors"]
    return m


def _damaged(m: Path) -> str:
    return (
        f"{str(m)!a} is damaged: manifest.json is missing but the folder holds ledger.jsonl (2 lines), "
        "state-000001.safetensors, the ledger and state of a saved model: the manifest was deleted or lost. Restore "
        "the folder from a backup (do not save a new model into it: that would discard the ledger of applied "
        "requests); nothing was changed"
    )


def _ids(tmp_path: Path, data: bytes | str, name: str = "ids.txt") -> str:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(p)


# ------------------------------------------------------------------ B5: a lost manifest is a damaged folder
def test_lost_manifest_verify_fails_status_and_forget_refuse(lost, tmp_path, capsys):
    before = folder_state(lost)
    assert main(["verify", "--model", str(lost)]) == 1  # was 2: "holds no saved model ... save the model again"
    err = capsys.readouterr().err
    assert err == f"mcmc-unlearner verify: FAILED: 1 problem(s)\n  - {_damaged(lost)}\n"
    assert main(["verify", "--model", str(lost), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["problems"] == [_damaged(lost)] and out["requests"] == 0
    res = verify(lost)
    assert not res.ok and res.problems == [_damaged(lost)] and res.head is None
    for cmd, extra in (("status", []), ("forget", ["--ids", _ids(tmp_path, "3")])):
        assert main([cmd, "--model", str(lost), *extra]) == 2
        assert capsys.readouterr().err == f"mcmc-unlearner {cmd}: error: {_damaged(lost)}\n"
    with pytest.raises(DamagedFolderError) as exc:
        status(lost)
    assert str(exc.value) == _damaged(lost)
    with pytest.raises(DamagedFolderError):
        forget(lost, [3])
    assert folder_state(lost) == before


def test_save_model_refuses_to_delete_the_ledger_of_a_lost_manifest(lost):
    before = folder_state(lost)
    ledger = (lost / "ledger.jsonl").read_bytes()
    with pytest.raises(StoreError) as exc:  # was: saved, deleting ledger.jsonl (2 lines -> 1) and state-000001
        save_gmm(lost, tiny_gmm(bank=10))
    assert str(exc.value) == (
        f"{_damaged(lost)} (save_model refused: choose a new folder, or overwrite=True to discard that ledger "
        "deliberately)"
    )
    assert folder_state(lost) == before and (lost / "ledger.jsonl").read_bytes() == ledger
    assert ledger.count(b"\n") == 2


def test_save_model_refuses_a_lone_state_file_and_says_what_an_interrupted_save_leaves(applied, tmp_path, capsys):
    m = tmp_path / "s"
    m.mkdir()
    shutil.copy(applied / "state-000001.safetensors", m / "state-000001.safetensors")
    before = folder_state(m)
    with pytest.raises(StoreError, match=r"holds state-000001\.safetensors, the ledger and state"):
        save_gmm(m, tiny_gmm(bank=4, burn=20))
    assert folder_state(m) == before
    # what a save interrupted after its state file and ledger line leaves: refused too, with the way out
    e = tmp_path / "e"
    e.mkdir()
    shutil.copy(applied / "state-000001.safetensors", e / "state-000000.safetensors")
    (e / "ledger.jsonl").write_bytes((applied / "ledger.jsonl").read_bytes().splitlines(keepends=True)[0])
    before = folder_state(e)
    assert main(["status", "--model", str(e)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds ledger.jsonl (1 line), state-000000.safetensors" in err
    assert "if a save into it was interrupted, no request was applied: delete the folder and save again" in err
    with pytest.raises(StoreError, match="delete the folder and save again"):
        save_gmm(e, tiny_gmm(bank=4, burn=20))
    assert folder_state(e) == before


def test_save_model_still_clears_its_own_debris_and_overwrite_is_deliberate(lost, tmp_path):
    # an empty ledger (a save cut before its first byte) and temp files hold no history: saved over as before
    d = tmp_path / "d"
    d.mkdir()
    (d / "ledger.jsonl").write_bytes(b"")
    (d / ".manifest.json.tmp-1-ab").write_bytes(b"x")
    save_gmm(d, tiny_gmm(bank=4, burn=20))
    assert sorted(os.listdir(d)) == ["ledger.jsonl", "manifest.json", "state-000000.safetensors"]
    assert verify(d).ok and status(d)["requests_applied"] == 0
    # overwrite=True discards the old ledger on purpose
    save_gmm(lost, tiny_gmm(bank=4, burn=20), overwrite=True)
    assert (lost / "ledger.jsonl").read_bytes().count(b"\n") == 1 and verify(lost).ok


def test_empty_folder_is_still_no_saved_model(tmp_path, capsys):
    e = tmp_path / "e"
    e.mkdir()
    assert main(["verify", "--model", str(e)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no saved model (manifest.json missing, and no ledger or state file" in err


# ------------------------------------------------------------------ B6a: the repair bank comes from the second half
def test_repair_needs_twice_the_bank_and_banks_only_second_half_states():
    assert [min_repair_steps(s) for s in (0, 1, 4, 4000)] == [1, 2, 8, 8000]
    _, sampler, data, un = tiny_gmm(bank=4, burn=50)
    with pytest.raises(UnlearningError) as exc:  # was: accepted, bank = states 4..7 of 7 (first half included)
        repair_chain(un, sampler, data, 7)
    assert str(exc.value) == (
        "repair_steps=7 is too few for the bank of 4 samples: the bank is refreshed from the run's second half "
        "only (the first half lets the chain mix on the remaining data), so use at least 8 (twice the bank size)"
    )
    for steps, keep, first in ((9, 1, 6), (21, 2, 14)):
        _, sampler, data, un = tiny_gmm(bank=4, burn=50)
        twin = tiny_gmm(bank=4, burn=50)
        record = repair_chain(un, sampler, data, steps)
        kept = run_chain(twin[0], twin[1], twin[2], twin[3].energy, steps, len(twin[2]), keep_every=keep)
        assert record["keep_every"] == keep and record["bank_steps"] == [first, first + 3 * keep]
        assert first > steps / 2  # every banked state lies in the run's second half
        assert torch.equal(un.bank, kept[-4:].to(un.bank.dtype))


def test_cli_refuses_too_few_repair_steps_unchanged(applied, tmp_path, capsys):
    m = tmp_path / "m"
    shutil.copytree(applied, m)
    before = folder_state(m)
    args = ["forget", "--model", str(m), "--ids", _ids(tmp_path, "3 14 15"), "--damping", "1e12"]
    assert main([*args, "--on-failure", "repair", "--repair-steps", "19"]) == 2  # bank 10: 19 < 20
    err = capsys.readouterr().err
    assert err == (
        "mcmc-unlearner forget: error: --repair-steps 19 is too few for the bank of 10 samples: the bank is refreshed "
        "from the run's second half only (the first half lets the chain mix on the remaining data), so use at least "
        "20 (twice the bank size)\n"
    )
    assert folder_state(m) == before


# ------------------------------------------------------------------ B6b: BOM, duplicate ids first, numbering
def test_a_leading_byte_order_mark_is_dropped(applied, tmp_path, capsys):
    assert read_ids(_ids(tmp_path, b"\xef\xbb\xbf3\n14\n")) == [3, 14]  # was: '\ufeff3' is not an id
    assert read_ids(_ids(tmp_path, b'\xef\xbb\xbf{"ids": [3, 14]}')) == [3, 14]
    assert read_ids("-", stdin=io.BytesIO(b"\xef\xbb\xbf5 6")) == [5, 6]
    with pytest.raises(InvalidRequestError, match="is empty"):
        read_ids(_ids(tmp_path, b"\xef\xbb\xbf\n"))
    with pytest.raises(InvalidRequestError, match=r"line 1: '\\ufeff3' is not an id"):  # only one, at the start
        read_ids(_ids(tmp_path, b"\xef\xbb\xbf\xef\xbb\xbf3"))
    m = tmp_path / "m"
    shutil.copytree(applied, m)
    rc = main(["forget", "--model", str(m), "--ids", _ids(tmp_path, b"\xef\xbb\xbf3\r\n14\r\n"), "--request-id", "b"])
    assert rc == 0 and "applied request b: removed 2 ids" in capsys.readouterr().out
    assert load_model(m).requests[-1]["ids"] == [3, 14]


def test_repeated_id_is_named_before_a_reused_request_id(applied, tmp_path, capsys):
    m = tmp_path / "m"
    shutil.copytree(applied, m)
    before = folder_state(m)
    msg = "deletion request: id(s) [9] appear more than once; list each id once"
    with pytest.raises(InvalidRequestError) as exc:  # was: "request id 'T1' was already used ... for different ids"
        forget(m, [9, 9], request_id="T1")
    assert str(exc.value) == msg
    assert main(["forget", "--model", str(m), "--ids", _ids(tmp_path, "9\n9\n"), "--request-id", "T1"]) == 2
    assert capsys.readouterr().err == f"mcmc-unlearner forget: error: {msg}\n"
    with pytest.raises(InvalidRequestError, match=r"request id 'T1' was already used \(ledger entry 1\)"):
        forget(m, [9], request_id="T1")
    assert folder_state(m) == before


def test_forget_and_verify_number_ledger_entries_alike(applied, tmp_path, capsys):
    m = tmp_path / "m"
    shutil.copytree(applied, m)
    first = status(m)["ledger_head"]
    assert main(["forget", "--model", str(m), "--ids", _ids(tmp_path, "30"), "--request-id", "T2"]) == 0
    assert "; ledger entry 2\n" in capsys.readouterr().out
    res = verify(m, expect_head=first)
    assert res.ok
    assert "the expected head is ledger entry 1 (line 2 of ledger.jsonl; entry 0 is the save); 1 entry came after" in (
        res.notes
    )  # was: "the expected head is ledger line 2; 1 entries came after"
    lines = (m / "ledger.jsonl").read_bytes().splitlines()
    assert json.loads(lines[1])["seq"] == 1 and json.loads(lines[1])["request_id"] == "T1"


# ------------------------------------------------------------------ B6c: big requests parsed fast
def test_a_16_mib_request_of_one_repeated_id_is_refused_without_a_list(applied, tmp_path, capsys):
    path = _ids(tmp_path, b"5\n" * (8 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequestError) as exc:
            read_ids(path, unique=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(exc.value) == "deletion request: id(s) [5] appear more than once; list each id once"
    # the file is 16 MiB: its bytes, one translated copy and small pieces (measured 41 MiB); a list of the 8.4
    # million ids alone is 64 MiB of pointers, and the line reader built several such lists (570 MB RSS)
    assert peak < 48 << 20, peak
    m = tmp_path / "m"
    shutil.copytree(applied, m)
    before = folder_state(m)
    assert main(["forget", "--model", str(m), "--ids", path]) == 2
    assert capsys.readouterr().err == (
        "mcmc-unlearner forget: error: deletion request: id(s) [5] appear more than once; list each id once\n"
    )
    assert folder_state(m) == before


def _reference(text: str) -> list[int]:
    """The documented text grammar, read the slow way."""
    return [int(t) for line in text.split("\n") for t in re.split(r"[ \t\r\f\v,]+", line.split("#", 1)[0]) if t]


def test_vectorised_reading_matches_the_grammar_across_pieces():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**63 - 1, size=200_000, dtype=np.int64).tolist()
    seps = [" ", ",", "\n", "\t", " , ", "\r\n", ",\n", "\x0b", "\x0c", "  # note é 12\n"]
    text = "".join(f"{i}{seps[k % len(seps)]}" for k, i in enumerate(ids))  # about 4 MiB: several pieces
    assert parse_ids(text) == _reference(text) == ids
    assert parse_ids(text.encode(), unique=True) == ids
    # a repeat in the last piece of the first id is found across pieces
    with pytest.raises(InvalidRequestError, match=rf"id\(s\) \[{ids[0]}\] appear more than once"):
        parse_ids(text + str(ids[0]), unique=True)
    assert parse_ids(text + str(ids[0]))[-1] == ids[0]  # without unique: read as written
    # ids written with 20 or more digits (leading zeros) and the largest id take the line reader, same result
    long = "0" * 25 + "7 9223372036854775807 " + text
    assert parse_ids(long) == [7, 2**63 - 1, *ids]
    with pytest.raises(InvalidRequestError, match=r"line 1: id '9223372036854775808' is too large"):
        parse_ids("1 9223372036854775808 1", unique=True)  # a malformed id is named before a repeat


def test_lissa_without_a_round_is_refused_before_any_work(applied, tmp_path, capsys):
    # the solver raised a ValueError mid-request (exit 70, internal error) since it refuses iter_T = 0
    m = tmp_path / "m"
    shutil.copytree(applied, m)
    before = folder_state(m)
    with pytest.raises(InvalidRequestError) as exc:
        forget(m, [7, 8], overrides={"solver": "lissa", "iter_T": 0})
    assert str(exc.value) == (  # Python's spelling (it named the command line's flags)
        "iter_T=0 leaves the lissa solver no round of its recursion; use iter_T=1 or more (e.g. 100)"
    )
    assert folder_state(m) == before
    args = ["forget", "--model", str(m), "--ids", _ids(tmp_path, "7 8"), "--solver", "lissa", "--iter-T", "0"]
    assert main(args) == 2
    assert capsys.readouterr().err == (  # the command line's
        "mcmc-unlearner forget: error: --iter-T 0 leaves the lissa solver no round of its recursion; use --iter-T 1 "
        "or more (e.g. 100)\n"
    )
    assert folder_state(m) == before


@pytest.mark.parametrize("how", ["replaced", "moved"])
def test_a_folder_moved_or_replaced_during_a_request_gets_none_of_its_writes(tmp_path, monkeypatch, how) -> None:
    """The lock holds the folder, the writes go by path: a backup restored in place while a forget ran received
    its writes (state-000000 deleted, a manifest of 5 entries over a 2-line ledger: verify failed) and the request
    exited 0 as applied in no consistent folder; a plain rename ended in a bare FileNotFoundError. Both are now
    refused before anything is written."""
    m = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    bak = tmp_path / "bak"
    shutil.copytree(m, bak)  # a backup of the saved model (ledger entry 0)
    forget(m, [4, 17], request_id="T1")
    restored = folder_state(bak)

    real_phase = fsio.phase

    def swap(name):
        real_phase(name)
        if name == "loaded":  # the request is under way: the operator restores the backup in place
            os.rename(m, tmp_path / "m.old")
            if how == "replaced":
                shutil.copytree(bak, m)

    monkeypatch.setattr(fsio, "phase", swap)
    with pytest.raises(StoreError, match="moved or replaced while the request ran"):
        forget(m, [5], request_id="T2")
    monkeypatch.setattr(fsio, "phase", real_phase)
    if how == "replaced":
        assert verify(m).ok  # was: "has 1 complete lines but 3 are committed", state-000000 deleted
        assert folder_state(m)[1:] == restored[1:]  # every file of the restored copy as it was
    assert verify(tmp_path / "m.old").ok


@pytest.mark.parametrize("name", ["state-000002.safetensors", "state-000099.safetensors"])
def test_a_directory_at_a_state_file_name_is_named_by_verify_and_forget(applied, tmp_path, capsys, name):
    """Stop 56's probe: a directory at the next state file's name (state-000002 after state-000001) made every
    request fail with "could not write the update ... (Is a directory); ... check free space and write permission",
    and verify said OK. Now verify lists it and forget refuses naming it, nothing changed."""
    m = tmp_path / "m"
    shutil.copytree(applied, m)
    (m / name).mkdir()
    before = folder_state(m)
    want = f"{m / name} is a directory; remove or rename it"
    res = verify(m)
    assert not res.ok and any(p.startswith(want) for p in res.problems), res.problems
    assert main(["forget", "--model", str(m), "--ids", _ids(tmp_path, "5\n")]) == 2
    err = capsys.readouterr().err
    assert want in err and "free space" not in err
    assert folder_state(m) == before
    (m / name).rmdir()
    assert verify(m).ok and forget(m, [5], request_id="T2").applied


def test_forget_refuses_to_commit_a_non_finite_unlearner_state(tmp_path: Path, monkeypatch) -> None:
    """Was (stop 56's review): a request whose carried influence or cached curvature came out NaN was committed,
    and every later load then refused the folder. Now the same check refuses the commit; no file is touched."""
    from mcmc_unlearner.service import checkpoint, deletion

    m = tmp_path / "m"
    save_gmm(m, tiny_gmm(bank=10))
    assert deletion.forget(m, [4, 17, 18], request_id="T1").applied
    before = folder_state(m)
    real = checkpoint.state_tensors

    def diverged(*a, **k):
        out = real(*a, **k)
        out["unlearner/carry"] = torch.full_like(out["unlearner/carry"], float("nan"))
        return out

    monkeypatch.setattr(checkpoint, "state_tensors", diverged)
    with pytest.raises(StoreError, match=r"not finite.*unlearner/carry.*nothing was changed"):
        deletion.forget(m, [5, 6], request_id="T2")
    assert folder_state(m) == before
    monkeypatch.setattr(checkpoint, "state_tensors", real)
    assert deletion.verify(m).ok
    assert deletion.forget(m, [5, 6], request_id="T2").applied
