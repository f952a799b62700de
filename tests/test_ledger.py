"""Budget ledger: fingerprints, composition of releases, refusal over budget, force, corrupt files."""

import json

import pytest

from privdiff.errors import PrivdiffError
from privdiff.privacy.accountants import composed_epsilon, epsilon_for
from privdiff.privacy.ledger import BudgetLedger, dataset_fingerprint
from privdiff.privacy.report import make_report

# Full-batch Gaussian releases keep the PLD accountant fast: one release is epsilon ~0.93 at delta 1e-5,
# two compose to ~1.36, three to ~1.70.
SIGMA, Q, STEPS, DELTA, BUDGET = 4.0, 1.0, 1, 1e-5, 1.5


def release(label=None):
    _, eps = epsilon_for(SIGMA, Q, STEPS, DELTA)
    return make_report(mechanism="gaussian", epsilon=eps, delta=DELTA, noise_multiplier=SIGMA, sample_rate=Q,
                       clip_norm=1.0, steps=STEPS, accountant="pld", dataset_size=10, dataset_label=label)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, content in enumerate([b"cat", b"dog", b"bird"]):
        (folder / f"{i}.png").write_bytes(content)
    return sorted(folder.iterdir())


def test_fingerprint_depends_on_contents_only(images, tmp_path):
    fp = dataset_fingerprint(images)
    assert len(fp) == 64
    assert dataset_fingerprint(list(reversed(images))) == fp
    renamed = tmp_path / "elsewhere.jpg"
    renamed.write_bytes(images[0].read_bytes())
    assert dataset_fingerprint([renamed, *images[1:]]) == fp
    images[0].write_bytes(b"cat, edited")
    assert dataset_fingerprint(images) != fp
    assert dataset_fingerprint(images[:2]) != dataset_fingerprint(images)


def test_fingerprint_errors(tmp_path):
    with pytest.raises(PrivdiffError, match="without files"):
        dataset_fingerprint([])
    missing = tmp_path / "missing.png"
    with pytest.raises(PrivdiffError, match=f"cannot read dataset file {missing}"):
        dataset_fingerprint([missing])


def test_ledger_composes_refuses_and_forces(images, tmp_path):
    path = tmp_path / "ledger.json"
    fp = dataset_fingerprint(images)
    ledger = BudgetLedger(path)
    ledger.set_budget(fp, BUDGET, DELTA)
    assert ledger.budget(fp) == (BUDGET, DELTA)
    assert ledger.spent(fp) == ("pld", 0.0)

    first, second, third = release("cats"), release("cats"), release("cats")
    ledger.check(fp, first)
    ledger.record(fp, first)
    ledger.check(fp, second)
    name, total = ledger.record(fp, second)
    assert (name, total) == ledger.spent(fp)
    assert total == composed_epsilon([(SIGMA, Q, STEPS)] * 2, DELTA)[1]
    assert first.epsilon < total < BUDGET

    before = path.read_bytes()
    with pytest.raises(PrivdiffError) as info:
        ledger.check(fp, third)
    message = str(info.value)
    assert "\n" not in message
    assert "with 2 earlier release(s) of this dataset (cats)" in message
    assert "budget epsilon=1.5 at delta=1e-05" in message and "force" in message
    assert path.read_bytes() == before  # a refusal writes nothing

    _, forced_total = ledger.check(fp, third, force=True)
    assert forced_total > BUDGET
    assert ledger.record(fp, third)[1] == forced_total
    releases = json.loads(path.read_text())["datasets"][fp]["releases"]
    assert [r["forced"] for r in releases] == [False, False, True]
    assert [r["release_id"] for r in releases] == [first.release_id, second.release_id, third.release_id]
    assert fp not in third.to_json()  # the fingerprint stays in the ledger
    with pytest.raises(PrivdiffError, match="already recorded"):
        ledger.record(fp, third)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ledger.json"]  # no temporary files


def test_ledger_needs_a_budget(images, tmp_path):
    ledger = BudgetLedger(tmp_path / "ledger.json")
    with pytest.raises(PrivdiffError, match="no privacy budget set for this dataset"):
        ledger.check(dataset_fingerprint(images), release())
    with pytest.raises(PrivdiffError, match="dataset fingerprint must be 64 lowercase hex digits"):
        ledger.set_budget("cats", 1.0, 1e-5)
    with pytest.raises(PrivdiffError, match="epsilon must be > 0, got 0"):
        ledger.set_budget(dataset_fingerprint(images), 0, 1e-5)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not JSON"),
        ("[]", "not a privdiff-budget-ledger file"),
        ('{"format": "privdiff-budget-ledger", "version": 1}', "missing key 'datasets'"),
        ('{"format": "privdiff-budget-ledger", "version": 1, "datasets": {"%s": {"budget": null, '
         '"releases": [{"release_id": "a", "noise_multiplier": -1, "sample_rate": 1, "steps": 1}]}}}' % ("0" * 64),
         "noise_multiplier must be > 0, got -1"),
    ],
)
def test_corrupt_ledger_is_named(tmp_path, content, reason):
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(PrivdiffError) as info:
        BudgetLedger(path).spent("0" * 64)
    message = str(info.value)
    assert message.startswith(f"budget ledger {path} is corrupt (") and reason in message
    assert "\n" not in message
