"""The deletion service's advice names the Python keyword to a Python caller and the flag on the command line
(``forget(..., on_failure=)`` / ``--on-failure``): its refusals named the command line's flags to Python callers."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from conftest import folder_state, save_gmm, tiny_gmm
from mcmc_unlearner import MCMCUnlearner
from mcmc_unlearner.cli import main
from mcmc_unlearner.errors import InvalidRequestError
from mcmc_unlearner.models.linreg import BayesianLinearRegression
from mcmc_unlearner.service import gate, requests
from mcmc_unlearner.service.checkpoint import load_model
from mcmc_unlearner.service.deletion import forget, status, verify
from mcmc_unlearner.service.gate import QualityGateError
from mcmc_unlearner.service.requests import as_flags, as_keywords, shown_as

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A saved model with one applied request (ids 4, 17 as request T1)."""
    m = save_gmm(tmp_path_factory.mktemp("spelling") / "m", tiny_gmm(bank=10))
    forget(m, [4, 17], request_id="T1")
    return m


def _copy(saved: Path, tmp_path: Path) -> Path:
    m = tmp_path / "m"
    shutil.copytree(saved, m)
    return m


# each: forget's keyword arguments, what Python says, what the command line says for the same refusal
CASES = [
    (
        {"on_failure": "bogus"},
        "on_failure must be one of refuse, repair, accept",
        None,  # (the command line refuses the value in its parser)
    ),
    ({"repair_steps": 0}, "repair_steps must be a whole number in [1, ", None),
    (
        {"ids": [5, 6], "request_id": "T1"},
        "was already used (ledger entry 1) for different ids; choose a new request_id",
        (["--ids-list", "5 6", "--request-id", "T1"], "; choose a new --request-id"),
    ),
]


@pytest.mark.parametrize("kwargs, python, cli", CASES, ids=["on_failure", "repair_steps", "request_id"])
def test_forget_refusals_name_the_keyword_from_python_and_the_flag_from_the_cli(
    saved, tmp_path, capsys, kwargs, python, cli
):
    m = _copy(saved, tmp_path)
    before = folder_state(m)
    kwargs = {"ids": [7, 8], **kwargs}
    with pytest.raises(InvalidRequestError) as exc:
        forget(m, kwargs.pop("ids"), **kwargs)
    assert python in str(exc.value)
    assert "--" not in str(exc.value), str(exc.value)
    assert folder_state(m) == before
    if cli is not None:
        argv, said = cli
        ids = tmp_path / "ids.txt"
        ids.write_text(argv[1])
        assert main(["forget", "--model", str(m), "--ids", str(ids), *argv[2:]]) == 2
        err = capsys.readouterr().err
        assert said in err and "request_id" not in err, err
        assert folder_state(m) == before


def test_repair_without_a_sampler_names_on_failure_for_python(saved, tmp_path):
    from mcmc_unlearner.service.gate import repair_chain

    _, _, data, un = tiny_gmm(bank=4, burn=50)
    with pytest.raises(Exception, match=r"on_failure='repair' needs the model's SG-MCMC sampler") as exc:
        repair_chain(un, None, data, 100)
    assert "--" not in str(exc.value)
    assert as_flags(str(exc.value)).startswith("--on-failure repair needs")
    assert "use --on-failure refuse or --on-failure accept" in as_flags(str(exc.value))


def test_verify_expect_head_names_the_keyword_from_python_and_the_flag_from_the_cli(saved, capsys):
    with pytest.raises(ValueError) as exc:
        verify(saved, expect_head="xyz")
    assert str(exc.value).startswith("expect_head='xyz' is not a ledger head"), str(exc.value)
    assert main(["verify", "--model", str(saved), "--expect-head", "xyz"]) == 2
    assert "error: --expect-head xyz is not a ledger head" in capsys.readouterr().err


@pytest.mark.parametrize(
    "python, cli",
    [
        ("retry later or pass wait=SECONDS (nothing was changed)", "retry later or pass --wait SECONDS (nothing"),
        ("x is not a folder; model_dir takes the folder a model was saved into", "x is not a folder; --model takes"),
        ("m is signed: set MCMC_UNLEARNER_KEY or pass key= to write to it", "or pass --key-file to write to it"),
        ("repair_steps=7 is too few for the bank of 4 samples", "--repair-steps 7 is too few for the bank"),
    ],
)
def test_the_command_line_spells_the_service_advice_as_its_flags(python, cli):
    assert cli in as_flags(python)
    assert "--" not in python


def test_the_large_removal_warning_names_the_service_keyword_from_python():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g)
    y = x.sum(1) + torch.randn(50, generator=g)
    model = BayesianLinearRegression(3)
    un = MCMCUnlearner(
        model, nll=lambda m, b: m.nll(b), log_prior=lambda m: m.log_prior(), bank=torch.randn(40, 3, generator=g) * 0.1
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        un.propose((x[:15], y[:15]), (x[15:], y[15:]))  # 30% of the rows
    text = [str(w.message) for w in caught if "removes 30% of the data" in str(w.message)]
    assert text, [str(w.message) for w in caught]
    assert "on_failure='repair'" in text[0] and "--" not in text[0], text[0]
    assert "--on-failure repair does this only" in as_flags(text[0])


# a request that fails two quality checks: the cg solve's (no iterations: "raise iter_T, or use solver='auto'")
# and the large removal's (120 of 200 rows: "on_failure='repair'")
_FAILING = {"solver": "cg", "bank_shift": "mean", "iter_T": 0}
_MANY = list(range(120))


def test_the_recorded_problems_name_the_keyword_from_python_and_the_flag_from_the_cli(tmp_path, capsys):
    """A request's quality problems (raised with a refusal, recorded in the ledger under accept) named the command
    line's flags (``--iter-T``, ``--on-failure repair``) to a Python caller whose error named the keywords: they
    are spelled as the caller's error is."""
    python = save_gmm(tmp_path / "py", tiny_gmm(bank=10))
    cli = tmp_path / "cli"
    shutil.copytree(python, cli)
    with pytest.raises(QualityGateError) as exc:  # refused: nothing recorded, the error carries the problems
        forget(python, _MANY, overrides=_FAILING)
    assert "raise iter_T, or use solver='auto'" in str(exc.value) and "--" not in str(exc.value)
    refused = exc.value.problems
    assert any("raise iter_T, or use solver='auto'" in p for p in refused), refused
    assert any("(on_failure='repair')" in p for p in refused) and not any("--" in p for p in refused), refused

    out = forget(python, _MANY, overrides=_FAILING, on_failure="accept")
    (entry,) = load_model(python).requests
    recorded = entry["quality"]["problems"]
    assert recorded == out.quality["problems"] == refused, recorded
    assert entry["quality"]["passed"] is False

    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(map(str, _MANY)))
    flags = [
        "forget",
        "--model",
        str(cli),
        "--ids",
        str(ids),
        "--solver",
        "cg",
        "--bank-shift",
        "mean",
        "--iter-T",
        "0",
    ]
    assert main(flags) == 4
    assert "raise --iter-T, or use --solver auto" in capsys.readouterr().err
    assert main([*flags, "--on-failure", "accept"]) == 0
    (entry,) = load_model(cli).requests
    recorded = entry["quality"]["problems"]
    assert any("raise --iter-T, or use --solver auto" in p for p in recorded), recorded
    assert any("(--on-failure repair)" in p for p in recorded), recorded
    assert not any("iter_T" in p or "on_failure" in p for p in recorded), recorded
    assert recorded == [as_flags(p) for p in refused]  # the same problems, each in the other spelling


def test_forget_refuses_an_unknown_interface_before_touching_the_folder(saved, tmp_path):
    m = _copy(saved, tmp_path)
    before = folder_state(m)
    with pytest.raises(InvalidRequestError, match="interface must be 'python' or 'cli'"):
        forget(m, [7, 8], interface="web")
    assert folder_state(m) == before


# ------------------------------------------------------------- recorded problems, shown to the other interface
def _ids_file(tmp_path: Path) -> Path:
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(map(str, _MANY)))
    return ids


_CLI_FAILING = ["--solver", "cg", "--bank-shift", "mean", "--iter-T", "0", "--on-failure", "accept"]


def _cli_status(m: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", "--model", str(m), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_problems_recorded_from_python_are_shown_as_flags_by_the_command_line(tmp_path, capsys):
    """``status`` and a resent request's "DEGRADED (...)" line printed the problems as recorded: Python's
    keywords (``raise iter_T``, ``on_failure='repair'``) on the command line."""
    m = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    forget(m, _MANY, overrides=_FAILING, on_failure="accept")
    (entry,) = load_model(m).requests
    recorded = entry["quality"]["problems"]
    assert any("raise iter_T" in p for p in recorded), recorded
    before = folder_state(m)

    st = _cli_status(m, capsys)
    for shown in (st["degraded_requests"][0]["problems"], st["last_request"]["quality"]["problems"]):
        assert shown == [as_flags(p) for p in recorded], shown
        assert any("raise --iter-T, or use --solver auto" in p for p in shown), shown
        assert any("(--on-failure repair)" in p for p in shown), shown
        assert not any("iter_T" in p or "on_failure" in p for p in shown), shown

    assert main(["forget", "--model", str(m), "--ids", str(_ids_file(tmp_path)), *_CLI_FAILING]) == 0
    said = capsys.readouterr().out
    assert said.startswith("already applied") and "model DEGRADED (" in said, said
    assert "raise --iter-T, or use --solver auto" in said and "iter_T" not in said, said

    assert status(m)["degraded_requests"][0]["problems"] == recorded  # Python is shown what Python recorded
    assert folder_state(m) == before  # shown, not rewritten: the ledger is as it was
    assert load_model(m).requests[0]["quality"]["problems"] == recorded


def test_problems_recorded_from_the_command_line_are_shown_as_keywords_to_python(tmp_path, capsys):
    m = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    assert main(["forget", "--model", str(m), "--ids", str(_ids_file(tmp_path)), *_CLI_FAILING]) == 0
    (entry,) = load_model(m).requests
    recorded = entry["quality"]["problems"]
    assert any("raise --iter-T" in p for p in recorded), recorded
    before = folder_state(m)

    st = status(m)
    for shown in (st["degraded_requests"][0]["problems"], st["last_request"]["quality"]["problems"]):
        assert shown == [as_keywords(p) for p in recorded], shown
        assert any("raise iter_T, or use solver='auto'" in p for p in shown), shown
        assert any("(on_failure='repair')" in p for p in shown), shown
        assert not any("--" in p for p in shown), shown

    out = forget(m, _MANY, overrides=_FAILING, on_failure="accept")  # resent: already applied
    assert not out.applied
    assert out.quality["problems"] == st["degraded_requests"][0]["problems"]
    assert out.entry["quality"]["problems"] == recorded  # the entry itself as recorded

    assert _cli_status(m, capsys)["degraded_requests"][0]["problems"] == recorded
    assert folder_state(m) == before


# problems an older version recorded: text naming no option, and the mix of flags and keywords of before stop 52
_OLD = "the step was refused by the safety net: the held rows' NLL rose 12% (limit 5%); see the ledger"
_MIXED = "the cg solve stopped after 0 iterations: raise --iter-T or use solver='auto'"


def test_problems_an_older_version_recorded_are_shown_unchanged_or_respelled(tmp_path, capsys, monkeypatch):
    m = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    with monkeypatch.context() as mp:  # recorded as an older version wrote them: verbatim
        mp.setattr(gate, "quality_problems", lambda report, un: [_OLD, _MIXED])
        mp.setattr(requests, "spelling", lambda interface: lambda text: text)
        forget(m, [3, 5], on_failure="accept")
    assert load_model(m).requests[0]["quality"]["problems"] == [_OLD, _MIXED]

    cli = _cli_status(m, capsys)["degraded_requests"][0]["problems"]
    assert cli == [_OLD, "the cg solve stopped after 0 iterations: raise --iter-T or use --solver auto"]
    python = status(m)["degraded_requests"][0]["problems"]
    assert python == [_OLD, "the cg solve stopped after 0 iterations: raise iter_T or use solver='auto'"]


@pytest.mark.parametrize(
    "text",
    [
        _OLD,
        _MIXED,
        "committed before the quality gate with an unconverged solve (residual 0.3)",
        "pass wait=SECONDS or --wait SECONDS; raise --repair-steps, e.g. tenfold",
        "solver='kfac'/'cg' and iter_T=1e-3.",
        "tol=bank_shift=wait",  # a chain: its second key was spelled by a second pass
        "x--tol=iter_T=--iter-T damping=-1 a.iter_T iter_T_max",
        "",
    ],
)
def test_showing_recorded_text_twice_changes_nothing_and_text_naming_no_option_is_left_as_it_is(text):
    for show in (shown_as("python"), shown_as("cli"), as_flags, as_keywords):
        assert show(show(text)) == show(text), (show, text)
    if not any(k in text for k in ("=", "--", "iter_T", "on_failure")):
        assert shown_as("python")(text) == shown_as("cli")(text) == text


def test_status_refuses_an_unknown_interface(saved):
    with pytest.raises(InvalidRequestError, match="interface must be 'python' or 'cli'"):
        status(saved, interface="web")


# ------------------------------------------------------------- forget --json, as status --json says it
def test_forget_json_says_the_quality_and_problems_as_status_json_does(tmp_path, capsys):
    """``forget --json`` printed the ledger entry alone, its problems as recorded: Python's keywords (``raise
    iter_T``) for a request sent from Python and resent on the command line, where the text and ``status`` name the
    flags. It keeps ``entry`` as recorded and adds the entry's ``quality``, ``degraded`` and ``problems`` exactly as
    ``status --json`` gives them for it, and ``recovered``."""
    m = save_gmm(tmp_path / "m", tiny_gmm(bank=10))
    forget(m, _MANY, overrides=_FAILING, on_failure="accept")
    (entry,) = load_model(m).requests
    assert any("raise iter_T" in p for p in entry["quality"]["problems"])
    ids = str(_ids_file(tmp_path))
    capsys.readouterr()
    assert main(["forget", "--model", str(m), "--ids", ids, *_CLI_FAILING, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    st = _cli_status(m, capsys)
    assert doc["applied"] is False and doc["entry"] == json.loads(json.dumps(entry))  # the entry as recorded
    assert doc["quality"] == st["last_request"]["quality"]
    assert doc["degraded"] is st["degraded"] is True
    assert doc["problems"] == st["degraded_requests"][0]["problems"] == doc["quality"]["problems"]
    assert any("raise --iter-T, or use --solver auto" in p for p in doc["problems"]), doc["problems"]
    assert not any("iter_T" in p or "on_failure" in p for p in doc["problems"]), doc["problems"]
    assert doc["recovered"] == {"rolled_back": [], "removed_files": []}
    assert main(["forget", "--model", str(m), "--ids", ids, *_CLI_FAILING]) == 0  # the text says the same
    said = capsys.readouterr().out
    assert f"model DEGRADED ({'; '.join(doc['problems'])}; see status)" in said, said

    # applied now from the command line, passing: the same keys, nothing degraded
    other = tmp_path / "other.txt"
    other.write_text("150 151")
    assert main(["forget", "--model", str(m), "--ids", str(other), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    st = _cli_status(m, capsys)
    assert doc["applied"] is True and doc["entry"] == load_model(m).requests[-1]
    assert doc["quality"] == st["last_request"]["quality"] == doc["entry"]["quality"]
    assert doc["quality"]["passed"] is True and doc["degraded"] is False and doc["problems"] == []
    assert [d["request_id"] for d in st["degraded_requests"]] == [entry["request_id"]]


def test_an_entry_from_before_the_quality_gate_is_shown_degraded_as_status_lists_it():
    """A ledger entry without a quality record (before the gate) whose solve did not converge: ``status`` lists it
    as degraded, and so does what ``forget`` says of it (it read "already applied" alone)."""
    from mcmc_unlearner.service.deletion import _degraded, shown_entry

    old = {"event": "forget", "request_id": "R", "seq": 3, "converged": False, "residual": 0.3}
    for interface in ("python", "cli"):
        said = shown_entry(old, interface)
        (listed,) = _degraded([old], shown_as(interface))
        assert said == {"quality": None, "degraded": True, "problems": listed["problems"]}
        assert said["problems"] == ["committed before the quality gate with an unconverged solve (residual 0.3)"]
    assert shown_entry({**old, "converged": True, "residual": 1e-9}, "cli") == {
        "quality": None,
        "degraded": False,
        "problems": [],
    }


def test_a_wrong_typed_override_names_the_keyword_from_python_and_the_flag_from_the_cli(saved, tmp_path, capsys):
    """Stop 56's closing note: ``forget(..., overrides={"tol": True})`` was refused naming the command line's
    ``--tol``; from Python it names the keyword, on the command line the flag, and the folder is untouched."""
    m = _copy(saved, tmp_path)
    before = folder_state(m)
    for overrides, said in [({"tol": True}, "tol must be a number"), ({"iter_T": -1}, "iter_T must be between 0")]:
        with pytest.raises(InvalidRequestError) as exc:
            forget(m, [7, 8], overrides=overrides)
        assert str(exc.value).startswith(said) and "--" not in str(exc.value), str(exc.value)
        with pytest.raises(InvalidRequestError) as exc:
            forget(m, [7, 8], overrides=overrides, interface="cli")
        assert str(exc.value).startswith(said.replace("iter_T", "--iter-T").replace("tol", "--tol")), str(exc.value)
    assert folder_state(m) == before
    ids = tmp_path / "ids.txt"
    ids.write_text("7 8")
    assert main(["forget", "--model", str(m), "--ids", str(ids), "--iter-T", "-1"]) == 2
    assert "--iter-T must be between 0" in capsys.readouterr().err
    assert folder_state(m) == before
