"""Budget ledger: per-image charges, reservations under a lock, budgets, crashes, concurrency, corrupt files."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from privdiff.errors import PrivdiffError
from privdiff.privacy.accountants import composed_epsilon
from privdiff.privacy.ledger import BudgetLedger, image_digests, request_key
from privdiff.privacy.report import make_report

# Full-batch Gaussian releases keep the PLD accountant fast: under add-remove one release is epsilon ~0.93 at
# delta 1e-5, two compose to ~1.36, three to ~1.70.
SIGMA, Q, STEPS, DELTA, BUDGET = 4.0, 1.0, 1, 1e-5, 1.5


def release(label=None, relation="add-remove"):
    return make_report(mechanism="gaussian", epsilon=0.93, delta=DELTA, noise_multiplier=SIGMA, sample_rate=Q,
                       clip_norm=1.0, steps=STEPS, accountant="pld", relation=relation, public_size=10,
                       dataset_label=label)


def write_images(folder, contents):
    folder.mkdir(exist_ok=True)
    for i, content in enumerate(contents):
        (folder / f"{i}.png").write_bytes(content)
    return sorted(folder.iterdir())


@pytest.fixture
def digests(tmp_path):
    return image_digests(write_images(tmp_path / "data", [b"cat", b"dog", b"bird"]))


def test_digests_depend_on_contents_only_and_refuse_duplicates(tmp_path):
    files = write_images(tmp_path / "a", [b"cat", b"dog"])
    renamed = tmp_path / "elsewhere.jpg"
    renamed.write_bytes(b"cat")
    assert sorted(image_digests([renamed, files[1]])) == sorted(image_digests(files))
    with pytest.raises(PrivdiffError, match="is identical to .*counts twice"):
        image_digests([*files, renamed])
    with pytest.raises(PrivdiffError, match="cannot read image file"):
        image_digests([tmp_path / "missing.png"])
    assert request_key(["a" * 64, "b" * 64], {"x": 1}) == request_key(["b" * 64, "a" * 64], {"x": 1})
    assert request_key(["a" * 64], {"x": 1}) != request_key(["a" * 64], {"x": 2})


def test_reservations_compose_refuse_and_force(digests, tmp_path):
    path = tmp_path / "ledger.json"
    ledger = BudgetLedger(path)
    first = ledger.reserve(digests, release("cats"), budget=(BUDGET, DELTA))
    first.commit()
    ledger.reserve(digests, release("cats")).commit()
    spend = ledger.spent(digests)
    assert spend.epsilon == composed_epsilon([(SIGMA, Q, STEPS)] * 2, DELTA)[1] < BUDGET
    assert spend.relation == "add-remove" and spend.releases == 2

    before = path.read_bytes()
    with pytest.raises(PrivdiffError) as info:
        ledger.reserve(digests, release("cats"))
    message = str(info.value)
    assert "\n" not in message and "over 3 release(s)" in message and "budget epsilon=1.5" in message
    assert path.read_bytes() == before  # a refusal writes nothing

    forced = release()
    ledger.reserve(digests, forced, force=True).commit()
    entries = json.loads(path.read_text())["releases"]
    assert [e["forced"] for e in entries.values()] == [False, False, True]
    assert all(e["status"] == "committed" for e in entries.values())
    assert not any(d in forced.to_json() for d in digests)  # image digests stay in the ledger
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ledger.json"]  # no temporary or lock files


def test_a_folder_plus_one_image_inherits_the_spend(tmp_path):
    old = image_digests(write_images(tmp_path / "old", [b"a", b"b", b"c"]))
    ledger = BudgetLedger(tmp_path / "ledger.json")
    for _ in range(3):
        ledger.reserve(old, release(), budget=(1.8, DELTA)).commit()  # three releases: ~1.70 of 1.8
    grown = image_digests(write_images(tmp_path / "grown", [b"a", b"b", b"c", b"new"]))
    with pytest.raises(PrivdiffError, match="release refused"):
        ledger.reserve(grown, release())
    fresh = image_digests(write_images(tmp_path / "fresh", [b"x", b"y", b"z"]))
    ledger.reserve(fresh, release()).commit()  # other images have their own spend


def test_replace_one_releases_compose_under_replace_one(digests, tmp_path):
    ledger = BudgetLedger(tmp_path / "ledger.json")
    ledger.reserve(digests, release(), budget=(10.0, DELTA)).commit()
    ledger.reserve(digests, release(relation="replace-one")).commit()
    spend = ledger.spent(digests)
    assert spend.relation == "replace-one" and spend.accountant == "pld"
    assert spend.epsilon == composed_epsilon([(SIGMA, Q, STEPS)] * 2, DELTA, "pld", relation="replace-one")[1]


def test_budget_rules(digests, tmp_path):
    path = tmp_path / "ledger.json"
    ledger = BudgetLedger(path)
    with pytest.raises(PrivdiffError, match=r"budget delta 0.5 must be below 1/N = 0.333 for N=3 images"):
        ledger.reserve(digests, release(), budget=(1.0, 0.5))
    assert not path.exists()
    ledger.reserve(digests, release(), budget=(BUDGET, DELTA)).commit()
    ledger.reserve(digests, release(), budget=(BUDGET, DELTA)).commit()  # the same budget again is fine
    before = path.read_bytes()
    with pytest.raises(PrivdiffError, match="already has the budget epsilon=1.5.*change_budget"):
        ledger.reserve(digests, release(), budget=(100.0, DELTA))
    assert path.read_bytes() == before
    ledger.reserve(digests, release(), budget=(100.0, DELTA), change_budget=True).commit()
    assert json.loads(path.read_text())["budget"] == {"epsilon": 100.0, "delta": DELTA}


def test_without_a_budget_the_ledger_only_records(digests, tmp_path):
    ledger = BudgetLedger(tmp_path / "ledger.json")
    for _ in range(3):
        ledger.reserve(digests, release()).commit()
    assert ledger.spent(digests) is None and len(ledger.summary()["releases"]) == 3


def test_cancel_restores_the_ledger(digests, tmp_path):
    path = tmp_path / "ledger.json"
    ledger = BudgetLedger(path)
    ledger.reserve(digests, release(), budget=(BUDGET, DELTA)).cancel()
    assert not path.exists()  # the cancelled reservation had created it
    ledger.reserve(digests, release(), budget=(BUDGET, DELTA)).commit()
    before = path.read_text()
    ledger.reserve(digests, release(), budget=(5.0, DELTA), change_budget=True).cancel()
    assert path.read_text() == before  # budget and images restored
    committed = next(iter(json.loads(before)["releases"]))
    with pytest.raises(PrivdiffError, match="was committed"):
        ledger.clear(committed)


def _reserve_and_commit(path, contents, budget):
    from privdiff.privacy.ledger import BudgetLedger as Ledger

    ledger = Ledger(path)
    digests = [__import__("hashlib").sha256(c).hexdigest() for c in contents]
    try:
        ledger.reserve(digests, release(), budget=budget).commit()
        return True
    except PrivdiffError:
        return False


@pytest.mark.parametrize(("workers", "budget", "allowed"), [(30, None, 30), (8, (BUDGET, DELTA), 2)])
def test_concurrent_processes_never_exceed_the_budget_nor_lose_entries(tmp_path, workers, budget, allowed):
    path = tmp_path / "ledger.json"
    contents = [b"cat", b"dog", b"bird"]
    with multiprocessing.get_context("fork").Pool(min(workers, 8)) as pool:
        results = pool.starmap(_reserve_and_commit, [(path, contents, budget)] * workers)
    entries = json.loads(path.read_text())["releases"]
    assert sum(results) == allowed == len(entries)
    assert all(e["status"] == "committed" for e in entries.values())


def test_a_killed_run_keeps_its_reservation_until_cleared(digests, tmp_path):
    path = tmp_path / "ledger.json"
    BudgetLedger(path).reserve(digests, release(), budget=(BUDGET, DELTA)).commit()
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_ledger import release
        from privdiff.privacy.ledger import BudgetLedger
        BudgetLedger({str(path)!r}).reserve({digests!r}, release())
        os.kill(os.getpid(), signal.SIGKILL)  # killed before writing or committing
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ledger = BudgetLedger(path)
    entries = json.loads(path.read_text())["releases"]
    reserved = [i for i, e in entries.items() if e["status"] == "reserved"]
    assert len(reserved) == 1 and ledger.spent(digests).releases == 2  # counted, conservatively
    with pytest.raises(PrivdiffError, match="release refused"):
        ledger.reserve(digests, release())  # a third would exceed 1.5
    ledger.clear(reserved[0])
    assert ledger.spent(digests).releases == 1
    with pytest.raises(PrivdiffError, match="is not in ledger"):
        ledger.clear(reserved[0])


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a privdiff-budget-ledger file"),
        ('{"format": "privdiff-budget-ledger", "version": 1, "datasets": {}}', "version 1 is not 2"),
        ('{"format": "privdiff-budget-ledger", "version": 2, "budget": null, "images": {}}',
         "the ledger has no 'releases'"),
        ('{"format": "privdiff-budget-ledger", "version": 2, "budget": null, "images": {}, "releases": {"a": '
         '{"status": "committed", "relation": "add-remove", "noise_multiplier": -1, "sample_rate": 1, "steps": 1}}}',
         "noise_multiplier must be a finite number in [0.001, 1e+06], got -1"),
        ('{"format": "privdiff-budget-ledger", "version": 2, "budget": {"epsilon": 1, "delta": 2}, "images": {}, '
         '"releases": {}}', "budget delta must be in (0, 1)"),
    ],
)
def test_corrupt_ledger_is_named(tmp_path, content, reason, digests):
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(PrivdiffError) as info:
        BudgetLedger(path).spent(digests)
    message = str(info.value)
    assert message.startswith(f"budget ledger {path} is corrupt (") and reason in message
    assert "\n" not in message


def test_a_cancel_keeps_a_budget_that_a_later_release_relies_on(digests, tmp_path):
    path = tmp_path / "ledger.json"
    first = BudgetLedger(path).reserve(digests, release(), budget=(BUDGET, DELTA))  # creates the ledger
    BudgetLedger(path).reserve(digests, release()).commit()  # another run, under that budget
    first.cancel()
    assert json.loads(path.read_text())["budget"] == {"epsilon": BUDGET, "delta": DELTA}
    ledger = BudgetLedger(path)
    ledger.reserve(digests, release()).commit()
    with pytest.raises(PrivdiffError, match="release refused"):
        ledger.reserve(digests, release())


def test_a_symlinked_ledger_is_one_ledger(digests, tmp_path):
    real = tmp_path / "real" / "ledger.json"
    real.parent.mkdir()
    (tmp_path / "link.json").symlink_to(real)
    BudgetLedger(real).reserve(digests, release(), budget=(BUDGET, DELTA)).commit()
    BudgetLedger(tmp_path / "link.json").reserve(digests, release()).commit()
    assert (tmp_path / "link.json").is_symlink() and len(json.loads(real.read_text())["releases"]) == 2


def test_many_releases_of_one_image_still_compose(digests, tmp_path):
    ledger = BudgetLedger(tmp_path / "ledger.json")
    for i in range(40):  # calibrated sigmas differ in their last digits; the ledger rounds them down
        report = make_report(mechanism="gaussian", epsilon=0.93, delta=DELTA, noise_multiplier=40.0 + i * 1e-5,
                             sample_rate=Q, clip_norm=1.0, steps=STEPS, accountant="pld", relation="add-remove",
                             public_size=10)
        ledger.reserve(digests, report, budget=(BUDGET, DELTA)).commit()
    spend = ledger.spent(digests)
    assert spend.releases == 40 and spend.epsilon >= composed_epsilon([(40.0, Q, 40)], DELTA)[1]
