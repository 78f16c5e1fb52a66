"""Keyed integrity (HMAC-SHA256) of model folders and the rollback check (ledger head)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import folder_state, save_gmm, tiny_gmm
from mcmc_unlearner.cli import main
from mcmc_unlearner.service import integrity
from mcmc_unlearner.service.checkpoint import load_model
from mcmc_unlearner.service.deletion import forget, status, verify
from mcmc_unlearner.service.fsio import StoreError
from mcmc_unlearner.service.integrity import KEY_ENV, Key, resolve_key
from mcmc_unlearner.service.ledger import canonical_json, line_sha256

KEY = "0123456789abcdef-test-key"
OTHER = "fedcba9876543210-other-key"


@pytest.fixture(scope="module")
def objs():
    return tiny_gmm(bank=10)


@pytest.fixture
def signed(objs, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(KEY_ENV, KEY)
    return save_gmm(tmp_path / "signed", objs)


@pytest.fixture
def unsigned(objs, tmp_path) -> Path:
    return save_gmm(tmp_path / "plain", objs)


def _ids(tmp_path: Path, text: str = "1 2") -> str:
    p = tmp_path / "ids.txt"
    p.write_text(text)
    return str(p)


def test_keys(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert resolve_key() is None
    monkeypatch.setenv(KEY_ENV, KEY)
    k = resolve_key()
    assert k.secret == KEY.encode() and KEY not in repr(k) and len(k.key_id) == 16
    f = tmp_path / "key"
    f.write_bytes(OTHER.encode() + b"\n")
    assert resolve_key(f).secret == OTHER.encode()  # the file wins over the environment; newline dropped
    f.write_bytes(b"short\n")
    with pytest.raises(StoreError, match="at least 16"):
        resolve_key(f)
    with pytest.raises(StoreError, match="not found"):
        resolve_key(tmp_path / "none")
    assert Key(b"x" * 16).key_id != Key(b"y" * 16).key_id


def test_signed_folder_round_trip(signed, tmp_path, capsys):
    man = json.loads((signed / "manifest.json").read_text())
    assert man["integrity"] == {"scheme": "hmac-sha256", "key_id": Key(KEY.encode()).key_id}
    assert len(man["manifest_hmac"]) == 64
    assert main(["forget", "--model", str(signed), "--ids", _ids(tmp_path)]) == 0
    assert status(signed)["signature"] == "verified"
    assert main(["verify", "--model", str(signed)]) == 0
    assert "HMAC verified" in capsys.readouterr().out
    man = json.loads((signed / "manifest.json").read_text())
    assert man["sequence"] == 1 and "manifest_hmac" in man  # the commit re-signed it


def test_signed_folder_without_key(signed, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    before = folder_state(signed)
    assert main(["forget", "--model", str(signed), "--ids", _ids(tmp_path)]) == 2
    assert f"is signed: set {KEY_ENV} or pass --key-file" in capsys.readouterr().err
    assert folder_state(signed) == before
    assert status(signed)["signature"] == "unchecked"
    res = verify(signed)
    assert res.ok and "HMAC was not checked" in res.notes[0]
    keyfile = tmp_path / "k"
    keyfile.write_text(KEY + "\n")
    assert main(["forget", "--model", str(signed), "--ids", _ids(tmp_path), "--key-file", str(keyfile)]) == 0


def _rewrite_ledger_and_resign(m: Path, edit) -> None:
    """What an attacker with write access does: edit a ledger line, recompute the whole hash chain, re-checksum the
    manifest. Without a key this is a perfectly consistent folder."""
    lines = [json.loads(x) for x in (m / "ledger.jsonl").read_text().splitlines()]
    edit(lines)
    prev = "0" * 64
    raw = []
    for e in lines:
        e["prev_sha256"] = prev
        line = canonical_json(e)
        raw.append(line)
        prev = line_sha256(line.encode())
    (m / "ledger.jsonl").write_text("".join(x + "\n" for x in raw))
    man = json.loads((m / "manifest.json").read_text())
    man["ledger_head"] = prev
    _rechecksum(man)  # an HMAC, if there is one, cannot be recomputed without the key: it stays stale
    (m / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")  # as the library writes it


def _rechecksum(man: dict) -> None:
    body = {k: v for k, v in man.items() if k not in ("manifest_sha256", "manifest_hmac")}
    man["manifest_sha256"] = hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _hide_a_request(lines: list) -> None:
    lines[-1]["residual"] = 1e-12  # make a degraded removal look clean


def test_rewritten_ledger_detected_with_key(signed, tmp_path, capsys, monkeypatch):
    forget(signed, [1, 2])
    _rewrite_ledger_and_resign(signed, _hide_a_request)
    assert main(["verify", "--model", str(signed)]) == 1
    assert "HMAC mismatch" in capsys.readouterr().err  # the stale HMAC no longer matches the changed body
    # an attacker who also strips the signature is caught because a key is given
    man = json.loads((signed / "manifest.json").read_text())
    man.pop("integrity")
    man.pop("manifest_hmac")
    integrity.sign(man, None)
    (signed / "manifest.json").write_text(json.dumps(man))
    before = folder_state(signed)
    assert main(["verify", "--model", str(signed)]) == 1
    assert "is not signed, but an integrity key was given" in capsys.readouterr().err
    assert main(["forget", "--model", str(signed), "--ids", _ids(tmp_path, "5")]) == 2
    capsys.readouterr()
    assert folder_state(signed) == before
    # re-signed with a different key
    man = json.loads((signed / "manifest.json").read_text())
    integrity.sign(man, Key(OTHER.encode()))
    (signed / "manifest.json").write_text(json.dumps(man))
    res = verify(signed)
    assert not res.ok and "signed with another key" in res.problems[0]


def test_forged_hmac_detected(signed):
    man = json.loads((signed / "manifest.json").read_text())
    man["extra"] = {"note": "edited"}
    man["manifest_hmac"] = "0" * 64
    _rechecksum(man)
    (signed / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="HMAC mismatch"):
        load_model(signed)


def test_rewritten_ledger_undetectable_without_key_but_head_catches_it(unsigned, tmp_path, capsys):
    """Without a key a recomputed chain is self-consistent; the recorded head is what detects it."""
    out = forget(unsigned, [1, 2])
    head = out.head
    _rewrite_ledger_and_resign(unsigned, _hide_a_request)
    assert verify(unsigned).ok  # consistent, and that is the limit of unkeyed checksums
    assert main(["verify", "--model", str(unsigned), "--expect-head", head]) == 1
    assert "is not the expected head" in capsys.readouterr().err


def test_rollback_detected_by_expect_head(unsigned, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(unsigned, old)  # a backup at head H0
    h0 = status(unsigned)["ledger_head"]
    assert main(["forget", "--model", str(unsigned), "--ids", _ids(tmp_path)]) == 0
    out = capsys.readouterr().out
    h1 = out.strip().splitlines()[-1].removeprefix("ledger head: ")
    assert h1 == status(unsigned)["ledger_head"] != h0
    assert main(["verify", "--model", str(unsigned), "--expect-head", h1]) == 0
    assert "matches the expected head" in capsys.readouterr().out
    # the whole folder rolled back to the older, perfectly consistent copy
    shutil.rmtree(unsigned)
    shutil.copytree(old, unsigned)
    assert verify(unsigned).ok
    assert main(["verify", "--model", str(unsigned), "--expect-head", h1]) == 1
    assert "rolled back" in capsys.readouterr().err
    # an older recorded head is fine: the folder moved on from it
    forget(unsigned, [1, 2])
    forget(unsigned, [3])
    res = verify(unsigned, expect_head=h0)
    assert res.ok and "2 entries came after" in res.notes[-1]
    for bad in ("abc", "g" * 64, h1[:-1]):
        assert main(["verify", "--model", str(unsigned), "--expect-head", bad]) == 2
        assert "--expect-head" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit",
    ["extra_unlearner", "extra_sampler_state", "alive_float", "means_double", "n_total", "drop_alive", "tol_str"],
)
def test_a_state_file_edited_with_its_checksums_recomputed_is_refused_not_converted(unsigned, edit):
    """Stop 46's probe: an extra tensor (an unknown unlearner entry, a sampler state for a parameter index the model
    does not have) or a tensor in another dtype, its checksums recomputed: verify said the folder was intact, and
    the next forget dropped the tensor or converted it. Refused now: nothing this library writes looks like it."""
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    man_path = unsigned / "manifest.json"
    man = json.loads(man_path.read_text())
    state = unsigned / man["state_file"]
    t = st_load(state.read_bytes())
    if edit == "extra_unlearner":
        t["unlearner/evil"] = torch.zeros(3)
    elif edit == "extra_sampler_state":
        t["sampler/state/7/momentum_buffer"] = torch.zeros(3)
    elif edit == "alive_float":
        t["data/alive"] = t["data/alive"].to(torch.float32)
    elif edit == "means_double":
        t["model/means"] = t["model/means"].to(torch.float64)
    elif edit == "drop_alive":  # was named as "'data/alive'" alone
        del t["data/alive"]
    elif edit == "tol_str":  # converted to 0.001 and called intact
        man["unlearner"]["tol"] = str(man["unlearner"]["tol"])
    else:
        man["data_config"]["n_total"] += 1000
    raw = st_save(t, metadata={"format": "mcmc-unlearner-model/1"})
    state.write_bytes(raw)
    man["state_sha256"] = hashlib.sha256(raw).hexdigest()
    man = {k: v for k, v in man.items() if k not in ("manifest_sha256", "manifest_hmac", "integrity")}
    integrity.sign(man, None)
    man_path.write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    before = folder_state(unsigned)
    with pytest.raises(StoreError, match="restore the folder from a backup") as refused:
        load_model(unsigned)
    said = {"extra_unlearner": "do not hold", "extra_sampler_state": "no parameter group names"}.get(edit, "dtype")
    said = "rows, the data have" if edit == "n_total" else said
    said = "tensor data/alive is missing" if edit == "drop_alive" else said
    said = "unlearner configuration in manifest.json holds tol=" if edit == "tol_str" else said
    assert said in str(refused.value)
    assert not verify(unsigned).ok
    with pytest.raises(StoreError):
        forget(unsigned, [1, 2])
    assert folder_state(unsigned) == before
