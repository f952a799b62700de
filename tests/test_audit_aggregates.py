"""The audits of the aggregate releases (privdiff.audit.aggregates, `privdiff audit aggregate | ti-aggregate |
guidance-target`): below the claim on the real mechanism, above it when the noise is removed, and not a release."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from privdiff.audit.aggregates import audit_aggregate, audit_dpagg_ti, audit_params, audit_style_target
from privdiff.cli.main import main
from privdiff.demo.data import write_style_images
from privdiff.embeddings.files import Embedding, save_embedding
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.errors import PrivdiffError
from privdiff.guidance.target import target_params
from privdiff.privacy.randomness import SecureRandom
from privdiff.release.dp_params import DPParams


def _load(name: str, file: str) -> object:
    """A helper module of tests/ (not a package), loaded by path."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


standins = _load("privdiff_audit_standins", "audit_standins.py")
checks = _load("privdiff_cli_checks", "cli_checks.py")
SIZE, DenoiserBackend, RandomFeatureEncoder = standins.SIZE, standins.DenoiserBackend, standins.RandomFeatureEncoder
refused, snapshot = checks.refused, checks.snapshot

# ε = 1 and q = 1 (every canary drawn in is in the run). M = 64: when the 13 highest scores are included canaries and
# the 13 lowest excluded ones, the guess pair (13, 13) alone is 26 of 26 correct, a bound of 1.48 > ε at 95 %
# (Bonferroni over the 10 pairs tried). With the noise removed the scores separate the canaries that well (AUC
# 0.95-0.99 on these models); the real noise (σ ≈ 3.7) buries each canary's contribution.
CANARIES = 64
EPSILON = 1.0
DELTA = 1e-5
CONFIG = TIConfig(steps=3, batch_size=16)
FIELDS = {"kind", "attack", "claimed_epsilon", "delta", "relation", "noise_multiplier", "sample_rate", "steps",
          "epsilon_lower_bound", "canaries", "included", "guesses", "correct", "k_plus", "k_minus", "confidence",
          "candidates", "release"}


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR, logger="privdiff")  # the low signal-to-noise warnings of every small run


@pytest.fixture
def no_noise(monkeypatch):
    """The test double of a broken mechanism: every noise draw of the release is zero."""
    monkeypatch.setattr(SecureRandom, "discrete_gaussian", lambda self, size, sigma: np.zeros(size, dtype=np.int64))


def _user_embeddings(count: int = 4) -> list[Embedding]:
    g = torch.Generator().manual_seed(0)
    return [Embedding({"clip_l": 0.02 * torch.randn(1, 768, generator=g)}) for _ in range(count)]


def _user_images(count: int = 4) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


AUDITS = {
    "aggregate": lambda seed: audit_aggregate(_user_embeddings(), DPParams(epsilon=EPSILON, delta=DELTA), CANARIES,
                                              seed=seed),
    "ti-aggregate": lambda seed: audit_dpagg_ti(DenoiserBackend(), _user_images(),
                                                DPParams(epsilon=EPSILON, delta=DELTA, clip_norm=0.05), CONFIG,
                                                CANARIES, seed=seed),
    "guidance-target": lambda seed: audit_style_target(RandomFeatureEncoder(), _user_images(),
                                                       target_params(EPSILON, DELTA), CANARIES, seed=seed),
}


@pytest.mark.parametrize("kind", sorted(AUDITS))
def test_the_real_mechanism_stays_below_its_claim(kind):
    for seed in range(3):
        result = AUDITS[kind](seed)
        assert result.kind == kind and result.canaries == CANARIES and result.relation == "add-remove"
        assert result.claimed_epsilon == EPSILON and result.epsilon_lower_bound <= EPSILON, (seed, result)


@pytest.mark.parametrize("kind", sorted(AUDITS))
def test_the_audit_catches_the_noise_removed(kind, no_noise):
    result = AUDITS[kind](0)
    assert result.epsilon_lower_bound > EPSILON, result


def test_the_audit_catches_the_aggregates_noise_shrunk_tenfold(monkeypatch):
    original = SecureRandom.discrete_gaussian
    monkeypatch.setattr(SecureRandom, "discrete_gaussian", lambda self, size, sigma: original(self, size, sigma / 10))
    # M = 256: σ/10 ≈ 0.37 leaves each canary's projection 2.7 noise std above zero, and more canaries buy a bound
    # that tolerates the few guesses the noise turns wrong (perfectly separated, (51, 51) alone would give 2.8).
    result = audit_aggregate(_user_embeddings(), DPParams(epsilon=EPSILON, delta=DELTA), 256, seed=0)
    assert result.epsilon_lower_bound > EPSILON, result


def test_the_run_is_add_remove_over_the_canaries():
    params = DPParams(epsilon=1.0, delta=1e-5)
    assert audit_params(params, 10, 64).public_size == 10 + 32
    declared = DPParams(epsilon=1.0, delta=1e-5, public_size=100, accountant="rdp")
    assert audit_params(declared, 10, 65).public_size == 100 + 32
    with pytest.raises(PrivdiffError, match=r"delta 0\.02 must be below 1/\(N \+ canaries\)"):
        audit_params(DPParams(epsilon=1.0, delta=2e-2), 10, 64)


# ------------------------------------------------------------------------------------------------ command line

def _embeddings_folder(root) -> str:
    folder = root / "per_image"
    folder.mkdir(parents=True)
    for i, embedding in enumerate(_user_embeddings()):
        save_embedding(embedding, folder / f"img{i}.safetensors")
    return str(folder)


def _audit_json(capsys, args: list[str]) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert set(result) == FIELDS and result["release"].startswith("none: an audit writes no file")
    return result, err


def test_cli_aggregate_writes_nothing_and_charges_no_ledger(tmp_path, capsys):
    embeddings = _embeddings_folder(tmp_path / "data")
    sources = write_style_images(tmp_path / "data" / "images", count=4, size=32)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    ledger = outputs / "ledger.json"
    assert main(["aggregate", "--embeddings", embeddings, "--one-image-per-file", "--epsilon", "1", "--delta", "1e-5",
                 "--out", str(outputs / "released.safetensors"), "--images", str(sources), "--ledger", str(ledger),
                 "--budget-epsilon", "8"]) == 0  # a real release, charged to the ledger
    before = snapshot(tmp_path)
    result, err = _audit_json(capsys, [
        "audit", "aggregate", "--embeddings", embeddings, "--one-image-per-file", "--epsilon", "1", "--delta", "1e-5",
        "--out", str(outputs / "style.safetensors"), "--ledger", str(ledger), "--budget-epsilon", "8",
        "--images", str(sources), "--canaries", "64", "--reproducible-seed", "3"])
    assert snapshot(tmp_path) == before  # no output, the ledger neither charged nor reserved, no canary anywhere
    note = [line for line in err.splitlines() if "ignored" in line]
    assert len(note) == 1
    assert all(flag in note[0] for flag in ("--out", "--ledger", "--budget-epsilon", "--images", "not a release"))
    assert result["kind"] == "aggregate" and result["canaries"] == 64 and result["claimed_epsilon"] == 1.0
    assert result["relation"] == "add-remove" and result["confidence"] == 0.95
    assert 0 <= result["correct"] <= result["guesses"] <= 64 and result["epsilon_lower_bound"] <= 1.0
    again, err = _audit_json(capsys, [
        "audit", "aggregate", "--embeddings", embeddings, "--one-image-per-file", "--epsilon", "1", "--delta", "1e-5",
        "--canaries", "64", "--reproducible-seed", "3"])
    assert again == result and "ignored" not in err  # the seed reproduces the canaries and the run


def test_cli_ti_aggregate_and_guidance_target_on_the_tiny_models(tmp_path, capsys):
    images = write_style_images(tmp_path / "private", count=3, size=32)
    before = snapshot(tmp_path)
    common = ["--images", str(images), "--epsilon", "2", "--delta", "1e-3", "--canaries", "8", "--confidence", "0.9",
              "--out", str(tmp_path / "x.safetensors"), "--ledger", str(tmp_path / "ledger.json"),
              "--reproducible-seed", "0"]
    ti, _ = _audit_json(capsys, ["audit", "ti-aggregate", "--model", "tiny", "--steps", "1", "--batch-size", "8",
                                 "--accountant", "rdp", "--public-size", "10", *common])
    assert ti["kind"] == "ti-aggregate" and ti["canaries"] == 8 and ti["confidence"] == 0.9
    assert ti["relation"] == "add-remove" and "textual-inversion" in ti["attack"]
    target, _ = _audit_json(capsys, ["audit", "guidance-target", "--image-encoder", "tiny", *common])
    assert target["kind"] == "guidance-target" and "image embedding" in target["attack"]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("--canaries", "1", "got 1"), ("--canaries", "many", "'many'"), ("--canaries", "100001", "got 100001"),
    ("--confidence", "1", "got 1"), ("--confidence", "0", "got 0"), ("--confidence", "nan", "got nan"),
])
def test_cli_bad_audit_options_are_named(tmp_path, capsys, option, value, needle):
    embeddings = _embeddings_folder(tmp_path)
    args = ["audit", "aggregate", "--embeddings", embeddings, "--one-image-per-file", "--epsilon", "1", "--delta",
            "1e-5", "--canaries", "64", option, value]
    refused(capsys, tmp_path, args, option, needle)


def test_cli_refusals_are_the_releases_own(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in (["ti-aggregate", "--model", "tiny"], ["guidance-target", "--image-encoder", "tiny"]):
        refused(capsys, tmp_path, ["audit", *command, "--images", empty, "--epsilon", "1", "--delta", "1e-5",
                                   "--canaries", "8"], "holds no images")
    embeddings = _embeddings_folder(tmp_path / "data")
    refused(capsys, tmp_path, ["audit", "aggregate", "--embeddings", embeddings, "--epsilon", "1", "--delta", "1e-5",
                               "--canaries", "8"], "--one-image-per-file")
    refused(capsys, tmp_path, ["audit", "aggregate", "--embeddings", embeddings, "--one-image-per-file",
                               "--epsilon", "1", "--delta", "0.05", "--canaries", "64"], "delta 0.05")


def test_canary_offsets_are_orthogonal_up_to_the_dimension():
    from privdiff.audit.canaries import canary_offsets

    apart = canary_offsets(64, 768, 2.0, SecureRandom(1)).double()
    gram = apart @ apart.T
    assert torch.allclose(gram, 4.0 * torch.eye(64, dtype=torch.float64), atol=1e-5)
    crowded = canary_offsets(10, 4, 1.0, SecureRandom(1))
    assert torch.allclose(crowded.norm(dim=1), torch.ones(10))
    assert not torch.equal(canary_offsets(8, 16, 1.0, SecureRandom(2)), canary_offsets(8, 16, 1.0, SecureRandom(3)))
