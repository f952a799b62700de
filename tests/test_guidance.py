"""DP Universal Guidance: the style target release and file, and the guided DDIM sampler (tiny models)."""

import math

import pytest
import torch
import torch.nn.functional as F

from privdiff.errors import PrivdiffError
from privdiff.guidance.sampler import GuidanceConfig, guidance_loss, guided_noise, sample
from privdiff.guidance.target import (
    StyleTarget,
    load_target,
    make_target,
    noisy_mean,
    plan_target,
    save_target,
    target_params,
)
from privdiff.models.image_encoders import tiny_image_encoder
from privdiff.models.sampling import cfg_noise
from privdiff.privacy.randomness import SecureRandom


@pytest.fixture(scope="module")
def encoder():
    return tiny_image_encoder()


def _conds(pipe, prompt="a painting of a cat", n=2):
    cond, uncond = pipe.encode_prompt([prompt] * n, pipe.device, 1, True, negative_prompt=[""] * n)
    return {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}


def _target(encoder, seed=0):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        return F.normalize(encoder.embed(image)[0], dim=0)


def test_unguided_single_pass_is_plain_ddim(tiny_sd1, sd1_backend):
    cond, uncond = _conds(tiny_sd1)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    config = GuidanceConfig(steps=8, cfg=3.0, weight=0.0, recurrence=1)
    ours = sample(sd1_backend, cond, uncond, latents, config, torch.Generator())
    tiny_sd1.set_progress_bar_config(disable=True)
    ref = tiny_sd1(prompt_embeds=cond["encoder_hidden_states"], negative_prompt_embeds=uncond["encoder_hidden_states"],
                   latents=latents.clone(), num_inference_steps=8, guidance_scale=3.0, output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_guidance_gradient_matches_finite_differences(sd1_backend, tiny_sd1, encoder):
    cond, uncond = _conds(tiny_sd1, n=1)
    target = _target(encoder)
    t = 501
    a = sd1_backend.alphas_cumprod[t]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))

    def loss(x: torch.Tensor) -> torch.Tensor:
        eps = cfg_noise(sd1_backend, x, t, cond, uncond, 3.0)
        return guidance_loss(sd1_backend, encoder, target, x, eps, a, 100.0)

    with torch.enable_grad():
        x = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(x), x)
    h = 1e-2
    with torch.no_grad():
        numeric = (loss(z + h * direction) - loss(z - h * direction)) / (2 * h)
    analytic = (grad * direction).sum()
    assert float(analytic) == pytest.approx(float(numeric), rel=0.05, abs=1e-3)
    # and guided_noise adds exactly sqrt(1 - a) * w * grad
    config = GuidanceConfig(cfg=3.0, weight=2.0)
    plain = guided_noise(sd1_backend, z, t, cond, uncond, GuidanceConfig(cfg=3.0, weight=0.0))
    guided = guided_noise(sd1_backend, z, t, cond, uncond, config, encoder, target)
    torch.testing.assert_close(guided - plain, (1 - a).sqrt() * 2.0 * grad, rtol=1e-3, atol=1e-5)


def _final_cosine(backend, encoder, target, z):
    with torch.no_grad():
        return F.cosine_similarity(encoder.embed(backend.decode_latents(z)), target[None], dim=-1)


def test_guidance_raises_cosine_to_the_target_over_seeds(sd1_backend, tiny_sd1, encoder):
    cond, uncond = _conds(tiny_sd1, n=4)
    gains = []
    for seed in range(4):
        target = _target(encoder, seed)
        latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        runs = [sample(sd1_backend, cond, uncond, latents, GuidanceConfig(steps=6, cfg=3.0, weight=w, recurrence=1),
                       torch.Generator().manual_seed(seed), encoder, target) for w in (0.0, 4.0)]
        plain, guided = (_final_cosine(sd1_backend, encoder, target, z) for z in runs)
        gains.append(float((guided - plain).mean()))
    assert all(g > 0 for g in gains), gains


def test_self_recurrence_runs_k_passes_per_step(sd1_backend, tiny_sd1, monkeypatch):
    cond, uncond = _conds(tiny_sd1, n=1)
    calls, seen = [], []
    original = type(sd1_backend).predict_noise

    def counting(self, latents, timesteps, c):
        calls.append(int(timesteps[0]))
        return original(self, latents, timesteps, c)

    monkeypatch.setattr(type(sd1_backend), "predict_noise", counting)
    config = GuidanceConfig(steps=5, cfg=2.0, weight=0.0, recurrence=3)
    sample(sd1_backend, cond, uncond, torch.randn(1, 4, 8, 8), config, torch.Generator().manual_seed(0),
           progress=lambda done, total: seen.append((done, total)))
    assert len(calls) == 15 and all(calls[i] == calls[i - i % 3] for i in range(15))
    assert len(set(calls)) == 5 and seen[-1] == (15, 15)


class _Constant:
    """An encoder that embeds every image as the same vector."""

    identity, dim = "constant", 4096

    def __init__(self):
        self.vector = torch.randn(self.dim, generator=torch.Generator().manual_seed(0)) * 3

    def embed(self, images):
        return self.vector.expand(len(images), -1).clone()


def test_target_noise_has_the_claimed_std_on_identical_inputs():
    enc = _Constant()
    n, q = 50, 0.5
    params = target_params(2.0, 1e-5, sample_rate=q, public_size=n)
    report = plan_target(params, n, enc.identity, seed=0)
    images = torch.zeros(n, 3, 8, 8)
    # identical inputs: the mean is (m/(q n))·u plus noise of std σ/(q n) per coordinate
    raw = noisy_mean(enc, images, q, report, SecureRandom(seed=3))
    u = F.normalize(enc.vector.double(), dim=0)
    scale = float(raw @ u)
    residual = raw - scale * u
    std = float(residual.std())
    assert std == pytest.approx(report.noise_multiplier / (q * n), rel=0.05)


def test_target_file_round_trip_carries_the_report(tmp_path, encoder):
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = make_target(encoder, images, target_params(4.0, 1e-3, public_size=12), dataset_label="cats")
    assert isinstance(target, StyleTarget) and target.vector.norm() == pytest.approx(1.0, abs=1e-5)
    assert target.report.private and target.report.bound == "normalize" and target.report.clip_norm == 1.0
    path = save_target(target, tmp_path / "style.safetensors")
    back = load_target(path)
    assert back.encoder == encoder.identity and back.report == target.report
    torch.testing.assert_close(back.vector, target.vector)
    with pytest.raises(PrivdiffError, match="exists"):
        save_target(target, path)


def test_target_refuses_other_bounds_and_bad_files(tmp_path):
    with pytest.raises(PrivdiffError, match="unit norm"):
        plan_target(target_params(1.0, 1e-5).__class__(epsilon=1.0, delta=1e-5, clip_norm=2.0), 10, "x")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(PrivdiffError, match="bad.safetensors"):
        load_target(bad)
    with pytest.raises(PrivdiffError, match="norm"):
        from privdiff.guidance.target import unit

        unit(torch.zeros(3))
    assert math.isfinite(GuidanceConfig().weight)
