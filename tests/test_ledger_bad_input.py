"""The bad-input contract of `privdiff ledger show|clear` (issue 20): ledgers with hostile contents (generated
with hypothesis, as tests/test_bad_input_properties.py does for flags) and paths of the wrong kind are refused in
one line naming the ledger and the field, exit 2, nothing changed, and nothing that is not a regular file opened."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privdiff.cli import main as cli

_spec = importlib.util.spec_from_file_location("privdiff_cli_checks", Path(__file__).with_name("cli_checks.py"))
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)
refused = _checks.refused

PROFILE = settings(derandomize=True, deadline=None, database=None, max_examples=300,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
RID = "0123456789abcdef0123456789abcdef"
DIGEST = "ab" * 32
ENTRY = {"status": "reserved", "mechanism": "gaussian", "relation": "add-remove", "noise_multiplier": 4.0,
         "sample_rate": 1.0, "steps": 1, "clip_norm": 1.0, "epsilon": 0.93, "delta": 1e-5, "accountant": "pld",
         "private": True, "dataset_label": None, "created": "2025-01-01T00:00:00+00:00",
         "reserved": "2025-01-01T00:00:00+00:00", "forced": False, "request": None, "output": None}
VALID = {"format": "privdiff-budget-ledger", "version": 2, "budget": {"epsilon": 1.5, "delta": 1e-5},
         "releases": {RID: ENTRY}, "images": {DIGEST: [RID]}}


def _write(path: Path, ledger: object) -> Path:
    path.write_text(ledger if isinstance(ledger, str) else json.dumps(ledger))
    return path


def test_a_valid_ledger_is_shown_and_cleared(tmp_path, capsys):
    path = _write(tmp_path / "ledger.json", VALID)
    assert cli.main(["ledger", "show", "--ledger", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["releases"][0]["release_id"] == RID
    assert cli.main(["ledger", "clear", "--ledger", str(path), RID]) == 0
    assert json.loads(path.read_text())["releases"] == {}


def test_paths_of_the_wrong_kind_are_named_and_never_opened(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "folder.json").mkdir()
    for command in (["show"], ["clear"]):
        extra = [RID] if command == ["clear"] else []
        refused(capsys, tmp_path, ["ledger", *command, "--ledger", tmp_path / "fifo.json", *extra], "is a FIFO")
        refused(capsys, tmp_path, ["ledger", *command, "--ledger", tmp_path / "folder.json", *extra], "is a folder")
        refused(capsys, tmp_path, ["ledger", *command, "--ledger", tmp_path / "none.json", *extra], "does not exist")
    entry = dict(ENTRY, output=str(tmp_path / "fifo.json"))
    path = _write(tmp_path / "ledger.json", dict(VALID, releases={RID: entry}))
    refused(capsys, tmp_path, ["ledger", "clear", "--ledger", path, RID], "is a FIFO", "its spend stays")


ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                        | st.text(max_size=8), lambda inner: st.lists(inner, max_size=2)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=4)
NOT_NUMBER = st.one_of(st.text(max_size=6), st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
HUGE = st.sampled_from([10**400, -(10**400), 1e308, -1e308])
NOT_FLOAT = st.sampled_from([10**400, -(10**400)])  # a budget may be any positive float, however large


def _floats(**bounds) -> st.SearchStrategy:
    return st.floats(allow_nan=False, allow_infinity=False, **bounds)


NOT_TEXT = st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=2), max_size=2), _floats())
BAD_FIELDS = {  # entry field -> values it must refuse
    "noise_multiplier": st.one_of(NOT_NUMBER, HUGE, _floats(max_value=9.99e-4), _floats(min_value=1.0001e6),
                                  st.just(1e-310)),
    "sample_rate": st.one_of(NOT_NUMBER, HUGE, _floats(max_value=9.9e-10), _floats(min_value=1.0000001)),
    "steps": st.one_of(NOT_NUMBER, HUGE, st.integers(max_value=0), st.integers(min_value=10**6 + 1),
                       st.just(1.0), st.just(True)),
    "clip_norm": st.one_of(NOT_NUMBER, HUGE, _floats(max_value=0)),
    "epsilon": st.one_of(NOT_NUMBER, HUGE, _floats(max_value=0)),
    "delta": st.one_of(NOT_NUMBER, HUGE, _floats(max_value=0), _floats(min_value=1)),
    "status": st.one_of(NOT_TEXT, st.text(max_size=9).filter(lambda s: s not in ("reserved", "committed"))),
    "relation": st.one_of(NOT_TEXT, st.text(max_size=9).filter(lambda s: s not in ("add-remove", "replace-one"))),
    "mechanism": st.one_of(NOT_TEXT, st.none(), st.just(""), st.just("m" * 201)),
    "accountant": st.one_of(NOT_TEXT, st.none(), st.just("")),
    "private": st.one_of(st.integers(), st.text(max_size=3), st.none()),
    "forced": st.one_of(st.integers(), st.text(max_size=3), st.none()),
    "output": st.one_of(NOT_TEXT, st.just("a\0b"), st.just("x" * 5000)),
    "dataset_label": NOT_TEXT,
    "created": NOT_TEXT,
    "committed": NOT_TEXT,
}


@st.composite
def hostile_ledger(draw) -> tuple[str, str]:
    """(ledger text, a word its refusal must hold): a valid ledger with one field made hostile, or hostile text."""
    data = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(["entry", "missing", "budget", "images", "ids", "top", "text"]))
    if kind == "entry":
        name = draw(st.sampled_from(sorted(BAD_FIELDS)))
        data["releases"][RID][name] = draw(BAD_FIELDS[name], label=name)
        return json.dumps(data), name
    if kind == "missing":
        name = draw(st.sampled_from(sorted(set(ENTRY) - {"status"})))
        del data["releases"][RID][name]
        return json.dumps(data), name
    if kind == "budget":
        data["budget"] = draw(st.one_of(NOT_NUMBER.filter(lambda v: v is not None),
                                        st.fixed_dictionaries({"epsilon": st.one_of(NOT_NUMBER, NOT_FLOAT, _floats(
                                            max_value=0)), "delta": st.just(1e-5)}),
                                        st.fixed_dictionaries({"epsilon": st.just(1.0), "delta": st.one_of(
                                            NOT_NUMBER, HUGE, _floats(max_value=0), _floats(min_value=1))})))
        return json.dumps(data), "budget"
    if kind == "images":
        digest = draw(st.one_of(st.text(max_size=70), st.just(DIGEST.upper())).filter(lambda d: d != DIGEST))
        data["images"] = {digest: [RID]}
        return json.dumps(data), "digest"
    if kind == "ids":
        data["images"][DIGEST] = draw(st.one_of(ANY_JSON.filter(lambda v: v != [RID] and v != []),
                                                st.just([RID, "missing"])).filter(lambda v: v not in ([RID], [])))
        return json.dumps(data), "release"
    if kind == "top":
        key = draw(st.sampled_from(["format", "version", "releases", "images"]))
        data[key] = draw(ANY_JSON.filter(lambda v: not isinstance(v, dict) or key in ("format", "version")))
        return json.dumps(data), "corrupt"
    text = json.dumps(data)
    return draw(st.sampled_from([
        text.replace("4.0", "NaN"), text.replace("4.0", "Infinity"), text.replace("4.0", "1e400"),
        "[" * 100_000 + "]" * 100_000, text.replace('"budget"', '"budget": ' + "[" * 50 + "]" * 50 + ', "b"'),
        text[: draw(st.integers(0, len(text) - 1))], text.encode().hex(),
    ])), "corrupt"


@PROFILE
@given(ledger=hostile_ledger(), command=st.sampled_from(["show", "clear"]))
def test_hostile_ledgers_are_refused_naming_the_field(tmp_path_factory, capsys, ledger, command):
    text, word = ledger
    root = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    path = _write(root / "ledger.json", text)
    args = ["ledger", command, "--ledger", path, *([RID] if command == "clear" else [])]
    line = refused(capsys, root, args, f"budget ledger {path}")
    # a field nested too deeply is refused with the whole file, before any field is read
    assert word in line or "corrupt" in line and (word == "corrupt" or "nested" in line), line


def test_an_oversized_ledger_is_refused_unread(tmp_path, capsys, monkeypatch):
    from privdiff.privacy import ledger

    monkeypatch.setattr(ledger, "MAX_LEDGER_BYTES", 100)
    path = _write(tmp_path / "ledger.json", VALID)
    refused(capsys, tmp_path, ["ledger", "show", "--ledger", path], "more than the 100")


@pytest.mark.parametrize("sigma", [1e-310, 5e-324, 1e-4])
def test_a_release_with_a_tiny_noise_multiplier_is_refused_not_an_overflow(tmp_path, capsys, sigma):
    path = _write(tmp_path / "ledger.json", dict(VALID, releases={RID: dict(ENTRY, noise_multiplier=sigma)}))
    refused(capsys, tmp_path, ["ledger", "show", "--ledger", path], "noise_multiplier", "[0.001, 1e+06]")
