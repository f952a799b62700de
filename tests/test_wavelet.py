"""Spectral DP generation (privdiff/wavelet): transform, tokenizer, prior, DP fine-tuning, resume, upsampling."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModuleExpandedWeights
from PIL import Image

from privdiff.errors import PrivdiffError
from privdiff.io.images import read_private_files
from privdiff.privacy import dpsgd
from privdiff.privacy.accountants import epsilon_for
from privdiff.privacy.dpsgd import microbatch_size
from privdiff.privacy.ledger import BudgetLedger
from privdiff.privacy.mechanism import _row_norm_bounds
from privdiff.reference.shapes import public_dataset
from privdiff.release.artifact import open_ledger
from privdiff.release.dp_params import DPParams
from privdiff.wavelet import training
from privdiff.wavelet.prior import PriorConfig, SpectralPrior, load_prior, save_prior
from privdiff.wavelet.tokenizer import fit_tokenizer, load_tokenizer
from privdiff.wavelet.transform import block_mean, decompose, reconstruct
from privdiff.wavelet.upsample import load_upscaler, refine
from privdiff.wavelet.workflow import finetune_prior, sample_prior

ROOT = Path(__file__).resolve().parents[1]


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(public_dataset(count, seed=seed)[0]).permute(0, 3, 1, 2).float()


def _write(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return fit_tokenizer(_images(120, seed=0), size=32, base=4, codebook_size=16, iterations=8)


@pytest.fixture(scope="module")
def public_prior(tokenizer, tmp_path_factory):
    """A tiny pre-trained public prior file."""
    prior = SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=32, layers=1, heads=2))
    training.pretrain(prior, tokenizer.encode(_images(60, seed=1)), training.TrainConfig(steps=5, batch_size=8))
    return save_prior(prior, tokenizer, tmp_path_factory.mktemp("priors") / "public.safetensors")


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("private"), _images(12, seed=7))


def test_haar_round_trip_is_exact_to_float_precision():
    x = np.random.default_rng(0).random((3, 3, 64, 64))
    assert np.abs(reconstruct(decompose(x, 4)) - x).max() < 1e-12
    bands = decompose(x, 4)
    assert [b.shape[-1] for b in bands] == [4, 4, 8, 16, 32] and bands[1].shape[1:3] == (3, 3)


def test_a_prefix_of_the_tokens_decodes_to_the_coarse_image(tokenizer):
    tokens = tokenizer.encode(_images(4, seed=3))
    assert tokens.shape == (4, tokenizer.length) and tokenizer.length == 64
    full = tokenizer.decode(tokens, clamp=False)
    for scales in range(1, 5):
        prefix = tokenizer.decode(tokens[:, : 16 * scales], clamp=False)
        side = 4 * 2 ** (scales - 1)
        assert prefix.shape == (4, 3, side, side)
        expected = torch.from_numpy(block_mean(full.double().numpy(), side)).float()
        torch.testing.assert_close(prefix, expected, atol=1e-5, rtol=0)
    with pytest.raises(PrivdiffError, match="whole scales"):
        tokenizer.decode(tokens[:, :10])


def test_tokenizer_file_round_trip_and_quality(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok.safetensors")
    again = load_tokenizer(path)
    assert again.identity == tokenizer.identity and again.length == tokenizer.length
    images = _images(8, seed=4)
    error = (tokenizer.decode(tokenizer.encode(images)) - images).abs().mean()
    assert error < (images - images.mean()).abs().mean() / 2  # the codebooks capture most of the image
    with pytest.raises(PrivdiffError, match="not a privdiff spectral tokenizer"):
        load_tokenizer(save_prior(SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=8, layers=1, heads=1)),
                                  tokenizer, tmp_path / "prior.safetensors"))


def test_opacus_per_sample_gradients_match_a_per_example_loop(tokenizer):
    config = PriorConfig.for_tokenizer(tokenizer, dim=16, layers=2, heads=2)
    reference, wrapped = SpectralPrior(config), SpectralPrior(config)
    wrapped.load_state_dict(reference.state_dict())
    tokens = tokenizer.encode(_images(4, seed=5))
    module = GradSampleModuleExpandedWeights(wrapped, loss_reduction="sum")  # as finetune wraps it
    module(tokens).sum().backward()
    for i in range(len(tokens)):
        reference.zero_grad()
        reference.loss(tokens[i:i + 1]).sum().backward()
        for p, q in zip(reference.parameters(), wrapped.parameters(), strict=True):
            assert q.grad is None  # only per-sample gradients are computed
            torch.testing.assert_close(q.grad_sample[i], p.grad, atol=1e-5, rtol=1e-4)
    module._close()


def _params(**overrides) -> DPParams:
    return DPParams(**{**dict(epsilon=None, delta=1e-3, sample_rate=0.5, clip_norm=1.0, noise_multiplier=1.2,
                              accountant="rdp"), **overrides})


def test_finetune_reports_the_accountants_epsilon_for_the_steps_that_ran(public_prior, private, tmp_path):
    config = training.TrainConfig(steps=4, batch_size=6, lr=1e-3)
    ledger = open_ledger(tmp_path / "ledger.json", read_private_files(private).digests)
    steps = []
    path, report, resumed = finetune_prior(public_prior, private, tmp_path / "dp.safetensors", _params(), config,
                                           ledger=ledger, checkpoint_dir=tmp_path / "ck",
                                           progress=lambda d, t: steps.append(d))
    assert steps == [1, 2, 3, 4] and not resumed and report.steps == 4
    assert report.epsilon == pytest.approx(epsilon_for(1.2, 0.5, 4, 1e-3, accountant="rdp", relation="add-remove")[1])
    loaded = load_prior(path)
    assert loaded.report.release_id == report.release_id and loaded.report.private
    assert not any((tmp_path / "ck").iterdir())  # the private checkpoint is gone once released
    (entry,) = BudgetLedger(tmp_path / "ledger.json").summary()["releases"]
    assert entry["status"] == "committed"


def test_an_interrupted_fine_tune_resumes_under_the_same_release(public_prior, private, tmp_path, monkeypatch):
    config = training.TrainConfig(steps=6, batch_size=6, lr=1e-3)
    ledger_path = tmp_path / "ledger.json"

    def run(progress=None):
        return finetune_prior(public_prior, private, tmp_path / "dp.safetensors", _params(), config,
                              ledger=open_ledger(ledger_path, read_private_files(private).digests),
                              checkpoint_dir=tmp_path / "ck", checkpoint_every=2, progress=progress)

    def interrupt_at_5(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(interrupt_at_5)
    assert not (tmp_path / "dp.safetensors").exists()
    (reserved,) = BudgetLedger(ledger_path).summary()["releases"]
    assert reserved["status"] == "reserved"  # the checkpoint holds private-derived state: the charge stays
    steps = []
    _, report, resumed = run(lambda d, t: steps.append(d))
    assert resumed and steps == [5, 6]  # steps 1-4 were checkpointed; 5 is redone, nothing runs twice in the release
    (entry,) = BudgetLedger(ledger_path).summary()["releases"]
    assert entry["status"] == "committed" and entry["release_id"] == reserved["release_id"] == report.release_id
    uninterrupted = training.plan_finetune(_params(), 12, config)
    assert report.epsilon == pytest.approx(uninterrupted.epsilon) and report.steps == uninterrupted.steps == 6


def test_sampling_is_reproducible_and_decodes_coarse_images(public_prior):
    images, loaded = sample_prior(public_prior, 3, seed=4)
    again, _ = sample_prior(public_prior, 3, seed=4)
    assert images.shape == (3, 3, 32, 32) and loaded.report is None
    torch.testing.assert_close(images, again)


def test_the_shipped_public_prior_is_public_and_draws_the_demo_size():
    from privdiff.demo.spectral import COARSE, PRIOR
    from privdiff.models.small_spec import SPECTRAL_PRIOR

    images, loaded = sample_prior(SPECTRAL_PRIOR, 2, seed=0)
    assert loaded.report is None  # public data only: no DP release, nothing private in it
    assert images.shape == (2, 3, COARSE, COARSE) and loaded.tokenizer.size == COARSE
    assert loaded.prior.config.dim == int(PRIOR[PRIOR.index("--dim") + 1])


def test_sd_refine_runs_on_the_tiny_models(sd1_backend):
    coarse = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = refine(sd1_backend, coarse, "a painting of a cat", size=32, strength=0.6, steps=10, seed=1)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out, refine(sd1_backend, coarse, "a painting of a cat", size=32, strength=0.6,
                                           steps=10, seed=1))
    with pytest.raises(PrivdiffError, match="strength"):
        refine(sd1_backend, coarse, "x", size=32, strength=0.0)


def test_upscaler_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a model")
    with pytest.raises(PrivdiffError) as info:
        load_upscaler(bad)
    assert "\n" not in str(info.value) and ("spandrel" in str(info.value))


def test_bad_input_is_refused_before_anything_is_written(public_prior, private, tokenizer, tmp_path):
    config = training.TrainConfig(steps=2, batch_size=4)
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (16, 16)).save(small / "tiny.png")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"no")
    (tmp_path / "empty").mkdir()
    other = fit_tokenizer(_images(40, seed=9), size=32, base=4, codebook_size=8, iterations=2)
    cases = [
        (lambda: finetune_prior(public_prior, small, tmp_path / "o.safetensors", _params(), config,
                                checkpoint_dir=tmp_path / "ck"), "tiny.png"),
        (lambda: finetune_prior(public_prior, corrupt, tmp_path / "o.safetensors", _params(), config,
                                checkpoint_dir=tmp_path / "ck"), "broken.png"),
        (lambda: finetune_prior(public_prior, tmp_path / "empty", tmp_path / "o.safetensors", _params(), config,
                                checkpoint_dir=tmp_path / "ck"), "empty"),
        (lambda: finetune_prior(public_prior, private, tmp_path / "o.safetensors", _params(delta=0.5), config,
                                checkpoint_dir=tmp_path / "ck"), "delta"),
        (lambda: finetune_prior(public_prior, private, tmp_path / "o.safetensors",
                                _params(noise_multiplier=None, epsilon=-1.0), config, checkpoint_dir=tmp_path / "ck"),
         "epsilon"),
        (lambda: load_prior(public_prior, other), "tokenizer"),
        (lambda: finetune_prior(public_prior, private, tmp_path / "ck" / "o.safetensors", _params(), config,
                                checkpoint_dir=tmp_path / "ck"), "checkpoint folder"),
    ]
    (tmp_path / "ck").mkdir()
    for call, needle in cases:
        with pytest.raises(PrivdiffError, match=needle) as info:
            call()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "o.safetensors").exists() and not any((tmp_path / "ck").iterdir())


def test_cli_runs_the_whole_method(tmp_path):
    public = _write(tmp_path / "public", _images(40, seed=11))
    private = _write(tmp_path / "private", _images(10, seed=12))

    def cli(*args):
        run = subprocess.run([sys.executable, "-m", "privdiff.cli", "wavelet", *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout)

    cli("tokenizer", "--images", str(public), "--out", "tok.safetensors", "--codebook-size", "8")
    cli("pretrain", "--tokenizer", "tok.safetensors", "--images", str(public), "--out", "prior.safetensors",
        "--steps", "3", "--dim", "16", "--layers", "1", "--heads", "2")
    done = cli("finetune", "--prior", "prior.safetensors", "--images", str(private), "--out", "dp.safetensors",
               "--epsilon", "10", "--delta", "1e-3", "--steps", "2", "--batch-size", "5",
               "--checkpoint-dir", str(tmp_path / "ck"), "--ledger", str(tmp_path / "ledger.json"))
    assert done["epsilon"] == 10.0 and done["steps"] == 2 and not done["resumed"]
    sampled = cli("sample", "--prior", "dp.safetensors", "--num-images", "2", "--out", "samples", "--scale", "2")
    assert len(sampled["coarse"]) == len(sampled["upsampled"]) == 2
    assert Image.open(tmp_path / sampled["upsampled"][0]).size == (64, 64)
    assert cli("inspect", "dp.safetensors")["privacy_report"]["release_id"] == done["release_id"]


def test_an_interrupted_pretraining_continues_to_the_same_prior(tokenizer, tmp_path):
    tokens = tokenizer.encode(_images(30, seed=13))
    config = training.TrainConfig(steps=6, batch_size=4)

    def fresh():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=16, layers=1, heads=2))

    straight = fresh()
    expected = training.pretrain(straight, tokens, config, seed=3)

    def stop_at_5(done, total):
        if done == 5:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "pretrain.pt"
    with pytest.raises(KeyboardInterrupt):
        training.pretrain(fresh(), tokens, config, seed=3, progress=stop_at_5, checkpoint=checkpoint,
                          checkpoint_every=2)
    steps, resumed = [], fresh()
    losses = training.pretrain(resumed, tokens, config, seed=3, progress=lambda d, t: steps.append(d),
                               checkpoint=checkpoint, checkpoint_every=2)
    assert steps == [5, 6] and losses == pytest.approx(expected)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def _prior_rows(prior, tokens, order, size):
    """Per-sample gradients of ``tokens[order]`` (flattened, all parameters), as finetune computes them."""
    module = GradSampleModuleExpandedWeights(prior, loss_reduction="sum")
    training.per_sample_gradients(module, tokens[order], size)
    rows = torch.cat([p.grad_sample.flatten(1) for p in prior.parameters()], dim=1)
    module._close()
    return rows


def test_an_examples_gradient_is_the_same_in_any_poisson_batch(tokenizer):
    """Example 0's per-sample gradient and norm bound are bit-identical alone, in a pair, or anywhere among many."""
    prior = SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=16, layers=2, heads=2))
    tokens = tokenizer.encode(_images(9, seed=5))
    size = 4
    alone = _prior_rows(prior, tokens, [0], size)[0]
    (bound,), _ = _row_norm_bounds([alone[None]])
    for order in ([1, 0], [0, 1], [2, 3, 4, 5, 6, 7, 8, 0, 1], [3, 4, 0, 1, 2, 5], [1, 2, 3, 4, 5, 6, 0]):
        rows = _prior_rows(prior, tokens, order, size)
        position = order.index(0)
        assert rows.shape[0] == len(order) and torch.equal(rows[position], alone), order
        bounds, _ = _row_norm_bounds([rows])
        assert torch.equal(bounds[position], bound), order


def test_finetune_sums_the_real_examples_only(tokenizer, monkeypatch):
    """Every forward has the microbatch's shape; the clipped sum holds the sampled examples, computed alone, and no
    dummy (whose own gradient is not zero)."""
    prior = SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=16, layers=1, heads=2))
    tokens = tokenizer.encode(_images(10, seed=6))
    reference = SpectralPrior(prior.config)
    reference.load_state_dict(prior.state_dict())
    shapes, sums, batches = [], [], []
    real_forward, real_sum, real_poisson = SpectralPrior.forward, dpsgd.clipped_sum, training.poisson_sample
    monkeypatch.setattr(SpectralPrior, "forward", lambda self, x: shapes.append(x.shape[0]) or real_forward(self, x))
    monkeypatch.setattr(dpsgd, "clipped_sum", lambda parts, c: sums.append([p.clone() for p in parts])
                        or real_sum(parts, c))
    monkeypatch.setattr(training, "poisson_sample", lambda n, q, rng: batches.append(real_poisson(n, q, rng))
                        or batches[-1])
    params = _params(sample_rate=0.7, clip_norm=0.05)
    config = training.TrainConfig(steps=1, batch_size=7)
    training.finetune(prior, tokens, params, config, training.plan_finetune(params, 10, config), seed=3)
    size = microbatch_size(7)
    assert size == 2 and set(shapes) == {size}
    (batch,), (parts,) = batches, sums
    assert len(batch) > size  # more than one microbatch, the last padded or not
    singles = torch.cat([_prior_rows(reference, tokens, [int(i)], size) for i in batch])
    assert torch.equal(torch.cat([p.flatten(1) for p in parts], dim=1), singles)
    dummy = _prior_rows(reference, torch.zeros_like(tokens[:1]), [0], size)
    assert dummy.norm() > 0
