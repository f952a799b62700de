"""privdiff/app/he.py (the Encrypted Sampler node's plain logic) with a toy denoiser: the encrypted loops
match the plaintext loop with the same noise, the last step reaches sigma 0, progress is the cancel point."""

from __future__ import annotations

import socket

import pytest
import torch

from privdiff.app import he as he
from privdiff.errors import PrivdiffError
from privdiff.he.sampler import HEConfig
from privdiff.he.steps import Update

SIGMAS = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.0], dtype=torch.float64)


def toy_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth, state-dependent stand-in for a denoiser: shrinks x toward a fixed pattern."""
    pattern = torch.linspace(-1, 1, x[0].numel(), dtype=x.dtype).view(x.shape[1:])
    weight = 1 / (1 + float(sigma) ** 2)
    return weight * x + (1 - weight) * torch.tanh(pattern + 0.1 * x)


def start(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * SIGMAS[0]


def noise_sampler(seed: int = 1) -> he.NoiseSampler:
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)


def plain_step(x: torch.Tensor, update: Update) -> torch.Tensor:
    return update.apply(x)


def plain(sampler: str) -> torch.Tensor:
    return he.sample(toy_denoise, start(), SIGMAS, plain_step, sampler, noise_sampler())


@pytest.mark.parametrize("sampler", he.SAMPLERS)
@pytest.mark.parametrize("packing", ["sparse", "dense"])
def test_encrypted_loop_matches_the_plaintext_loop(sampler: str, packing: str):
    config = HEConfig(sampler="euler", packing=packing, threshold=0.01)
    with he.encrypted_stepper(config) as stepper:
        out = he.sample(toy_denoise, start(), SIGMAS, stepper, sampler, noise_sampler())
    want = plain(sampler)
    assert torch.allclose(out, want, rtol=0, atol=1e-6), (out - want).abs().max()
    stats = stepper.stats
    assert stats.steps == len(SIGMAS) - 2 and stats.plain_steps == 1  # the step to sigma 0 is the prediction
    assert 0 < stats.fraction <= 1 and (packing == "sparse" or stats.fraction == 1)
    assert stats.sent > 0 and stats.received > 0


def test_last_step_to_sigma_zero_is_the_prediction():
    x = start()
    with he.encrypted_stepper(HEConfig(sampler="euler")) as stepper:
        out = he.sample(toy_denoise, x, SIGMAS[-2:], stepper)
    assert torch.equal(out, toy_denoise(x, SIGMAS[-2]))
    assert stepper.stats.plain_steps == 1 and stepper.stats.steps == 0


def test_ancestral_noise_is_drawn_on_every_step_but_the_last():
    calls = []

    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        calls.append((sigma, sigma_next))
        return torch.zeros(2, 4, 8, 8, dtype=torch.float64)

    he.sample(toy_denoise, start(), SIGMAS, plain_step, "euler_ancestral", noise)
    assert calls == [(float(a), float(b)) for a, b in zip(SIGMAS[:-2], SIGMAS[1:-1], strict=True)]


def k_diffusion(sampler: str, noise: he.NoiseSampler) -> torch.Tensor:
    """k-diffusion's sample_euler / sample_euler_ancestral (as ComfyUI ships them), written out."""
    x = start()
    for i in range(len(SIGMAS) - 1):
        sigma, sigma_next = SIGMAS[i], SIGMAS[i + 1]
        denoised = toy_denoise(x, sigma)
        d = (x - denoised) / sigma
        if sampler == "euler":
            x = x + d * (sigma_next - sigma)
            continue
        up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        down = (sigma_next**2 - up**2) ** 0.5
        x = denoised if down == 0 else x + d * (down - sigma) + noise(sigma, sigma_next) * up
    return x


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_plaintext_loop_is_k_diffusions(sampler: str):
    assert torch.allclose(plain(sampler), k_diffusion(sampler, noise_sampler()), rtol=0, atol=1e-12)


def test_progress_is_called_after_every_step_and_cancels():
    seen = []
    he.sample(toy_denoise, start(), SIGMAS, plain_step, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, len(SIGMAS) - 1) for i in range(1, len(SIGMAS))]

    class Cancelled(Exception):
        pass

    denoised = []

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        denoised.append(float(sigma))
        return toy_denoise(x, sigma)

    def cancel(done: int, total: int) -> None:
        if done == 2:
            raise Cancelled

    with he.encrypted_stepper(HEConfig(sampler="euler")) as stepper, pytest.raises(Cancelled):
        he.sample(denoise, start(), SIGMAS, stepper, progress=cancel)
    assert len(denoised) == 2 and stepper.stats.steps == 2


def test_worker_process_gives_the_same_result(he_worker):
    address = he_worker
    config = HEConfig(sampler="euler", encrypt_offsets=True)
    with he.encrypted_stepper(config, f" {address} ") as stepper:
        out = he.sample(toy_denoise, start(), SIGMAS, stepper, "euler_ancestral", noise_sampler())
    assert torch.allclose(out, plain("euler_ancestral"), rtol=0, atol=1e-6)
    text = he.sampler_report(config, stepper.stats, "euler_ancestral", "karras", 1.0, he.latent_noise("seed", 4),
                             address)
    assert f"worker at {address}" in text and "denoising: euler_ancestral," in text and "scheduler karras" in text
    assert "offsets encrypted" in text and "noise: seed 4" in text


def test_bad_input_is_a_one_line_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = [
        (lambda: he.check_worker("no-port"), "is not HOST:PORT"),
        (lambda: he.latent_noise("torch", 0), "noise 'torch' is not one of secret, seed"),
        (lambda: he.check_worker("host:99999"), "is not HOST:PORT"),
        (lambda: he.encrypted_stepper(HEConfig(sampler="euler"), f"127.0.0.1:{port}").__enter__(), "unreachable"),
        (lambda: HEConfig(threshold=1.0), "threshold must be in"),
        (lambda: HEConfig(threshold=-0.1), "threshold must be in"),
        (lambda: he.sample(toy_denoise, start(), SIGMAS, plain_step, "dpmpp_2m"), "has no encrypted step"),
        (lambda: he.sample(toy_denoise, start(), SIGMAS, plain_step, "euler_ancestral"), "needs a noise sampler"),
        (lambda: he.sample(toy_denoise, start(), torch.tensor([1.0, 0.0, 0.0]), plain_step), "not positive"),
    ]
    for call, message in cases:
        with pytest.raises(PrivdiffError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_no_steps_leave_the_state_alone():
    x = start()
    assert he.sample(toy_denoise, x, SIGMAS[:1], plain_step) is x
