"""DPAgg-TI: the released aggregate's noise and mean, Poisson sampling, SD1/SDXL end to end."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from privdiff.demo.data import write_style_images
from privdiff.embeddings import dpagg
from privdiff.embeddings.dpagg import aggregate_embedding_files, aggregate_embeddings, run_dpagg_ti
from privdiff.embeddings.files import Embedding, load_embedding, save_embedding
from privdiff.embeddings.textual_inversion import TIConfig, initial_vectors
from privdiff.errors import PrivdiffError
from privdiff.io.images import load_image_folder
from privdiff.models.tiny import tiny_pipeline
from privdiff.privacy.mechanism import bound_vectors, poisson_sample
from privdiff.privacy.randomness import SecureRandom
from privdiff.privacy.report import PrivacyReport
from privdiff.release.dp_params import DPParams, plan_release

TOKEN = "<dp-style>"
WIDTHS = {"clip_l": 768, "clip_g": 1280}


def _images(tmp_path, count: int) -> torch.Tensor:
    write_style_images(tmp_path / "private", count=count, size=32)
    return load_image_folder(tmp_path / "private", 32)[1]


def _clipped_mean(per_image: dict, center: dict, clip: float) -> dict:
    keys = sorted(center)
    flat = torch.cat([(per_image[k] - center[k]).flatten(1) for k in keys], dim=1)
    mean = bound_vectors(flat, clip).mean(0).split([center[k].numel() for k in keys])
    return {k: center[k] + p.view_as(center[k]) for k, p in zip(keys, mean, strict=True)}


def _flat(vectors: dict) -> torch.Tensor:
    return torch.cat([vectors[k].flatten() for k in sorted(vectors)])


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_noise_std_of_the_release(sample_rate):
    """Identical inputs, two releases: their difference has per-coordinate std sqrt(2) sigma C / (qN)."""
    n, clip, sigma = 8, 0.7, 1.3
    g = torch.Generator().manual_seed(0)
    center = {k: torch.randn(8, w, generator=g) for k, w in WIDTHS.items()}  # 16384 coordinates
    offset = {k: 0.001 * torch.randn(1, 8, w, generator=g) for k, w in WIDTHS.items()}
    per_image = {k: center[k] + offset[k].expand(n, -1, -1) for k in WIDTHS}
    kwargs = dict(divisor=sample_rate * n, clip_norm=clip, noise_multiplier=sigma)
    a = aggregate_embeddings(per_image, center, rng=SecureRandom(11), **kwargs)
    b = aggregate_embeddings(per_image, center, rng=SecureRandom(12), **kwargs)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in center.items()}
    diff = _flat(a) - _flat(b)
    expected = 2**0.5 * sigma * clip / (sample_rate * n)
    assert diff.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(diff.mean().item()) < 4 * expected / diff.numel() ** 0.5
    # Each release is centred on center + (sum of offsets) / (qN).
    signal = {k: center[k] + offset[k][0] * n / (sample_rate * n) for k in WIDTHS}
    err = _flat(a) - _flat(signal)
    assert err.std().item() == pytest.approx(expected / 2**0.5, rel=0.03)


def test_noise_std_of_aggregated_files(tmp_path):
    """The same through the aggregate-files path, with sigma calibrated by the accountant."""
    n = 6
    g = torch.Generator().manual_seed(1)
    vec = torch.randn(32, 768, generator=g) * 0.01  # 24576 coordinates, norm ~1.6 > C
    folder = tmp_path / "per_image"
    folder.mkdir()
    files = [save_embedding(Embedding({"clip_l": vec}), folder / f"img{i}.safetensors") for i in range(n)]
    params = DPParams(epsilon=1.0, delta=1e-3, clip_norm=0.5)
    a = aggregate_embedding_files(files, params, seed=1)
    b = aggregate_embedding_files(files, params, seed=2)
    sigma = a.report.noise_multiplier
    assert sigma == b.report.noise_multiplier and 5 < sigma < 8  # replace-one: about twice add-remove's sigma
    diff = a.embedding.vectors["clip_l"] - b.embedding.vectors["clip_l"]
    assert diff.std().item() == pytest.approx(2**0.5 * sigma * 0.5 / n, rel=0.03)
    assert not a.report.private and a.report.steps == 1 and a.report.public_size == n


# RDP at epsilon 1e4 finds its optimum at the smallest order: a valid, slightly conservative sigma.
@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_large_epsilon_approaches_the_clipped_mean():
    n, clip = 8, 1.0
    g = torch.Generator().manual_seed(2)
    center = {"clip_l": torch.randn(2, 768, generator=g)}
    scales = torch.linspace(0.3, 3.0, n)[:, None, None]  # half of the offsets are clipped
    per_image = {"clip_l": center["clip_l"] + scales * torch.randn(n, 2, 768, generator=g) / 768**0.5}
    report = plan_release("test", DPParams(epsilon=1e4, delta=1e-5, public_size=n), n, 1, center="zero")
    assert report.noise_multiplier < 0.05
    released = aggregate_embeddings(
        per_image, center, divisor=1.0 * n, clip_norm=clip,
        noise_multiplier=report.noise_multiplier, rng=SecureRandom(3),
    )
    want = _clipped_mean(per_image, center, clip)
    spread = (per_image["clip_l"] - want["clip_l"]).flatten(1).norm(dim=1).mean()
    error = (released["clip_l"] - want["clip_l"]).norm()
    assert error.item() == pytest.approx(report.noise_multiplier * clip * (2 * 768) ** 0.5 / n, rel=0.1)
    assert error < 0.05 * spread
    unclipped = per_image["clip_l"].mean(0)
    assert (unclipped - want["clip_l"]).norm() > 10 * error  # the clipping really mattered


def test_only_poisson_sampled_images_are_trained(tmp_path, sd1_backend, monkeypatch):
    images = _images(tmp_path, 10)
    q = 0.5
    # A seed whose sample is neither empty, full, nor of the expected size qN (so /qN is told from /m).
    seed = next(s for s in range(100) if len(poisson_sample(10, q, SecureRandom(s))) in (3, 7))
    expected = poisson_sample(10, q, SecureRandom(seed))  # the release stream's first draw
    seen = {}
    real_encode, real_train = dpagg.encode_each, dpagg.train_embeddings

    def encode(backend, imgs, generators):
        seen["images"] = imgs.clone()
        return real_encode(backend, imgs, generators)

    def train(backend, latents, init, config, generators, progress=None):
        seen["latents"], seen["calls"] = len(latents), seen.get("calls", 0) + 1
        seen["per_image"] = real_train(backend, latents, init, config, generators, progress)
        return seen["per_image"]

    monkeypatch.setattr(dpagg, "encode_each", encode)
    monkeypatch.setattr(dpagg, "train_embeddings", train)
    config = TIConfig(steps=1, batch_size=8)
    # A given sigma keeps this fast (calibrating at q < 1 takes seconds); PRV needs the add-remove relation.
    params = DPParams(epsilon=None, noise_multiplier=1.0, delta=1e-3, sample_rate=q, clip_norm=0.05,
                      accountant="prv", public_size=10)
    result = run_dpagg_ti(sd1_backend, images, params, config, seed=seed)
    assert seen["calls"] == 1 and seen["latents"] == len(expected)
    assert torch.equal(seen["images"], images[expected])
    assert result.report.sample_rate == q and not result.report.private
    # The release is the clipped sum of the sampled offsets plus N(0, sigma^2 C^2), over qN.
    init = initial_vectors(sd1_backend, config)
    clipped = _clipped_mean(seen["per_image"], init, 0.05)["clip_l"] - init["clip_l"]
    want = init["clip_l"] + clipped * len(expected) / (q * 10)
    got = result.embedding.vectors["clip_l"]
    noise = 1.0 * 0.05 * 768**0.5 / (q * 10)  # expected norm of the noise
    assert (got - want).norm().item() == pytest.approx(noise, rel=0.15)


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_run_with_large_epsilon_releases_the_clipped_mean(tmp_path, sd1_backend, monkeypatch):
    seen = {}
    real_train = dpagg.train_embeddings

    def train(*args, **kwargs):
        seen["per_image"] = real_train(*args, **kwargs)
        return seen["per_image"]

    monkeypatch.setattr(dpagg, "train_embeddings", train)
    config = TIConfig(steps=2, batch_size=4)
    params = DPParams(epsilon=1e4, delta=1e-3, clip_norm=0.1, public_size=4)
    result = run_dpagg_ti(sd1_backend, _images(tmp_path, 4), params, config)
    init = initial_vectors(sd1_backend, config)
    per_image = seen["per_image"]["clip_l"]
    assert (per_image - init["clip_l"]).flatten(1).norm(dim=1).min() > 0.1  # every offset is clipped
    want = _clipped_mean(seen["per_image"], init, 0.1)["clip_l"]
    spread = (bound_vectors(per_image - init["clip_l"], 0.1) - (want - init["clip_l"])).flatten(1).norm(dim=1)
    error = (result.embedding.vectors["clip_l"] - want).norm()
    assert error < 0.1 * spread.mean()
    assert error.item() == pytest.approx(result.report.noise_multiplier * 0.1 * 768**0.5 / 4, rel=0.2)


def test_nothing_sampled_trains_nothing(tmp_path, sd1_backend, monkeypatch):
    images = _images(tmp_path, 3)
    seed = next(s for s in range(100) if len(poisson_sample(3, 0.05, SecureRandom(s))) == 0)

    def train(*args, **kwargs):
        raise AssertionError("no image was sampled, nothing may be trained")

    monkeypatch.setattr(dpagg, "train_embeddings", train)
    params = DPParams(epsilon=None, noise_multiplier=1.0, delta=1e-3, sample_rate=0.05)
    result = run_dpagg_ti(sd1_backend, images, params, TIConfig(steps=1), seed=seed)
    vec = result.embedding.vectors["clip_l"]
    assert vec.shape == (1, 768) and torch.isfinite(vec).all()


def test_few_images_warn_with_the_expected_snr(tmp_path, sd1_backend, caplog):
    images = _images(tmp_path, 3)
    params = DPParams(epsilon=1.0, delta=1e-3)
    with caplog.at_level(logging.WARNING, logger="privdiff"):
        result = run_dpagg_ti(sd1_backend, images, params, TIConfig(steps=1))
    snr = 3 / (result.report.noise_multiplier * 768**0.5)
    assert result.expected_snr == pytest.approx(snr)
    assert f"signal-to-noise ratio of the release is {snr:.2f}" in caplog.text
    assert result.report.private


@pytest.mark.parametrize(("epsilon", "delta", "match"), [
    (0.0, 1e-3, "epsilon 0.0 must be a positive"),
    (-1.0, 1e-3, "epsilon -1.0 must be a positive"),
    (float("inf"), 1e-3, "epsilon inf must be a positive"),
    (1.0, 0.25, r"delta 0.25 must be in \(0, 1/N\)"),
    (1.0, 0.0, r"delta 0.0 must be in \(0, 1/N\)"),
])
def test_impossible_budgets_are_refused(epsilon, delta, match):
    with pytest.raises(PrivdiffError, match=match):
        plan_release("test", DPParams(epsilon=epsilon, delta=delta), 4, 1, center="zero")


def _generate(pipe) -> np.ndarray:
    return pipe(f"a painting in the style of {TOKEN}", num_inference_steps=2, guidance_scale=1.0,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_sd1_end_to_end(tmp_path, sd1_backend):
    images = _images(tmp_path, 4)
    params = DPParams(epsilon=2.0, delta=1e-3, clip_norm=0.1)
    result = run_dpagg_ti(sd1_backend, images, params, TIConfig(steps=2, batch_size=4, n_vectors=2),
                          dataset_label="demo")
    out = tmp_path / "out"
    out.mkdir()
    path = save_embedding(result.embedding, out / "dp_style.safetensors", token=TOKEN)
    assert sorted(p.name for p in out.iterdir()) == ["dp_style.safetensors"]
    assert set(load_file(path)) == {"emb_params"}
    loaded = load_embedding(path)
    assert loaded.family == "SD1" and loaded.vectors["clip_l"].shape == (2, 768)
    assert torch.equal(loaded.vectors["clip_l"], result.embedding.vectors["clip_l"])
    report = PrivacyReport.from_metadata(loaded.metadata)
    assert report.private and report.dataset_label == "demo" and report.epsilon == 2.0
    assert report.release_id == result.report.release_id and report.public_size == 4
    pipe = tiny_pipeline("sd1")
    pipe.load_textual_inversion(str(path), token=TOKEN)
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    torch.testing.assert_close(rows, loaded.vectors["clip_l"])
    images_out = _generate(pipe)
    assert images_out.shape == (1, 32, 32, 3) and np.isfinite(images_out).all()


def test_sdxl_end_to_end(tmp_path, sdxl_backend):
    images = _images(tmp_path, 3)
    params = DPParams(epsilon=2.0, delta=1e-3, clip_norm=0.1)
    result = run_dpagg_ti(sdxl_backend, images, params, TIConfig(steps=2, batch_size=3))
    vectors = result.embedding.vectors
    assert {k: tuple(v.shape) for k, v in vectors.items()} == {"clip_l": (1, 768), "clip_g": (1, 1280)}
    # One bound C for the whole embedding: the noise on both encoders has the same scale.
    init = initial_vectors(sdxl_backend, TIConfig())
    std = {k: (vectors[k] - init[k]).std().item() for k in vectors}
    expected = result.report.noise_multiplier * 0.1 / 3
    assert std["clip_l"] == pytest.approx(expected, rel=0.25) and std["clip_g"] == pytest.approx(expected, rel=0.2)
    path = save_embedding(result.embedding, tmp_path / "xl_style.safetensors")
    state = load_file(path)
    assert set(state) == {"clip_l", "clip_g"}
    loaded = load_embedding(path)
    assert loaded.family == "SDXL" and PrivacyReport.from_metadata(loaded.metadata).private
    pipe = tiny_pipeline("sdxl")
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    row = pipe.text_encoder_2.get_input_embeddings().weight[pipe.tokenizer_2.convert_tokens_to_ids(TOKEN)]
    torch.testing.assert_close(row.detach(), vectors["clip_g"][0])
    images_out = _generate(pipe)
    assert images_out.shape == (1, 32, 32, 3) and np.isfinite(images_out).all()


def test_aggregate_files_refuses_mismatched_widths(tmp_path):
    g = torch.Generator().manual_seed(0)
    files = [save_embedding(Embedding({"clip_l": torch.randn(1, 768, generator=g)}), tmp_path / f"a{i}.safetensors")
             for i in range(3)]
    bad = save_embedding(Embedding({"clip_h": torch.randn(1, 1024, generator=g)}), tmp_path / "b.safetensors")
    with pytest.raises(PrivdiffError, match=r"b\.safetensors has tensors"):
        aggregate_embedding_files([*files, bad], DPParams(epsilon=1.0, delta=1e-3))


def test_unknown_bound_is_refused_before_training(sd1_backend, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("training must not start")

    monkeypatch.setattr(dpagg, "train_embeddings", never)
    params = DPParams(epsilon=2.0, delta=1e-3, bound="squash")
    with pytest.raises(PrivdiffError, match="bound 'squash'"):
        run_dpagg_ti(sd1_backend, torch.rand(4, 3, 32, 32), params, TIConfig(steps=1))


def test_relation_follows_the_declared_public_size():
    replace = plan_release("test", DPParams(epsilon=1.0, delta=1e-3), 10, 1, center="zero")
    assert replace.relation == "replace-one" and replace.public_size == 10 and replace.accountant == "pld"
    add = plan_release("test", DPParams(epsilon=1.0, delta=1e-3, public_size=25), 10, 1, center="zero")
    assert add.relation == "add-remove" and add.public_size == 25
    assert replace.noise_multiplier > 1.8 * add.noise_multiplier  # replace-one moves the sum by up to 2C
    with pytest.raises(PrivdiffError, match="not both"):
        plan_release("test", DPParams(epsilon=1.0, noise_multiplier=2.0, delta=1e-3), 10, 1, center="zero")
    with pytest.raises(PrivdiffError, match="supports only the add-remove relation"):
        plan_release("test", DPParams(epsilon=1.0, delta=1e-3, accountant="rdp"), 10, 1, center="zero")


def test_progress_shows_a_public_total_whatever_was_sampled(tmp_path, sd1_backend):
    images = _images(tmp_path, 6)
    config = TIConfig(steps=2, batch_size=2)
    params = DPParams(epsilon=None, noise_multiplier=1.0, delta=1e-3, sample_rate=0.5)
    sizes = {len(poisson_sample(6, 0.5, SecureRandom(s))): s for s in range(200)}
    assert len(sizes) > 2
    for seed in list(sizes.values())[:3]:  # different sample sizes, the same public total ceil(q n / B) steps
        calls: list[tuple[int, int]] = []
        run_dpagg_ti(sd1_backend, images, params, config, seed=seed, progress=lambda d, t, c=calls: c.append((d, t)))
        assert {t for _, t in calls} == {4} and calls[-1] == (4, 4)
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)  # rescaled: no jump at the sample size
    declared = DPParams(epsilon=None, noise_multiplier=1.0, delta=1e-4, sample_rate=0.5, public_size=1000)
    calls = []
    run_dpagg_ti(sd1_backend, images, declared, config, seed=0, progress=lambda d, t: calls.append(t))
    assert set(calls) == {250 * config.steps}  # from the declared size, not the real N
