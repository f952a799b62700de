"""Batched per-image textual inversion equals training each image alone with the same random stream.

The exact comparisons run the tiny models in float64: in float32 the batched and the single-image UNet
calls round differently (~1e-7), and Adam's g / sqrt(v) turns that into visible differences on the odd
coordinate whose gradient is near zero. In float64 the two agree to the last bit.
"""

from __future__ import annotations

import pytest
import torch

from privdiff.embeddings.templates import TEMPLATES
from privdiff.embeddings.textual_inversion import (
    PLACEHOLDER,
    TIConfig,
    diffusion_loss,
    initial_vectors,
    train_embeddings,
)
from privdiff.errors import PrivdiffError

ATOL = 1e-5


def _float64_backend(family: str):
    from privdiff.models.diffusers_backend import DiffusersBackend
    from privdiff.models.tiny import tiny_pipeline

    backend = DiffusersBackend(tiny_pipeline(family).to(dtype=torch.float64))
    backend.freeze()
    return backend


@pytest.fixture(scope="module")
def sd1_f64():
    return _float64_backend("sd1")


def _latents(m: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _generators(m: int, base: int = 100) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(m)]


def _train_alone(backend, latent, init, config, gen) -> dict[str, torch.Tensor]:
    """Reference: one image, its own Adam, and the documented per-step draws (template, t, noise)."""
    templates = TEMPLATES[config.templates]
    params = {k: v.clone().unsqueeze(0).requires_grad_(True) for k, v in init.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)
    for _ in range(config.steps):
        template = int(torch.randint(len(templates), (), generator=gen))
        t = torch.randint(len(backend.alphas_cumprod), (), generator=gen)
        noise = torch.randn(latent.shape, generator=gen)
        prompt = templates[template].format(PLACEHOLDER)
        loss = diffusion_loss(backend, latent[None], t[None], noise[None], [prompt], params)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: p.detach()[0] for k, p in params.items()}


def _reference(backend, latents, init, config, base=100) -> dict[str, torch.Tensor]:
    rows = [_train_alone(backend, x, init, config, g) for x, g in zip(latents, _generators(len(latents), base),
                                                                      strict=True)]
    return {k: torch.stack([r[k] for r in rows]) for k in init}


def _assert_close(got: dict, want: dict, init: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=0)
        # Training moved every row (so agreement is not trivially init == init).
        moved = (want[k] - init[k]).flatten(1).norm(dim=1)
        assert bool((moved > 1e-3).all()), moved


@pytest.fixture(scope="module")
def sd1_reference(sd1_f64):
    config = TIConfig(steps=3, batch_size=1, n_vectors=2)
    latents = _latents(5)
    init = initial_vectors(sd1_f64, config)
    return config, latents, init, _reference(sd1_f64, latents, init, config)


@pytest.mark.parametrize("batch_size", [1, 3, 5])
def test_batched_equals_one_at_a_time_sd1(sd1_f64, sd1_reference, batch_size):
    config, latents, init, want = sd1_reference
    config = TIConfig(steps=config.steps, batch_size=batch_size, n_vectors=config.n_vectors)
    got = train_embeddings(sd1_f64, latents, init, config, _generators(len(latents)))
    assert set(got) == {"clip_l"} and got["clip_l"].shape == (5, 2, 768)
    _assert_close(got, want, init)


def test_batched_matches_one_at_a_time_in_float32(sd1_backend):
    """float32: equal up to rounding, except the rare Adam-amplified near-zero-gradient coordinate."""
    config = TIConfig(steps=3, batch_size=4)
    latents = _latents(4, seed=3)
    init = initial_vectors(sd1_backend, config)
    want = _reference(sd1_backend, latents, init, config)["clip_l"]
    got = train_embeddings(sd1_backend, latents, init, config, _generators(4))["clip_l"]
    close = ((got - want).abs() <= ATOL).float().mean()
    assert close >= 0.999, f"only {close:.4%} of coordinates agree to {ATOL}"
    assert (want - init["clip_l"]).abs().max() > 1e-3


def test_an_images_embedding_does_not_depend_on_its_chunk_or_position(sd1_backend):
    """float32, where kernels round by shape: image 4 trained last in a chunk of 2, alone in the last chunk, or
    first in a full chunk beside other images gets the same embedding bit for bit (the last chunk is padded to
    batch_size), so adding or removing an image moves no other image's row."""
    config = TIConfig(steps=2, batch_size=3)
    latents = _latents(5, seed=4)
    init = initial_vectors(sd1_backend, config)

    def train(order: list[int]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(100 + i) for i in order]
        return train_embeddings(sd1_backend, latents[order], init, config, gens)["clip_l"]

    in_pair, alone, first = train([0, 1, 2, 3, 4])[4], train([1, 2, 3, 4])[3], train([4, 2, 1])[0]
    assert torch.equal(in_pair, alone) and torch.equal(in_pair, first)
    assert (in_pair - init["clip_l"]).abs().max() > 1e-3


def test_batched_equals_one_at_a_time_sdxl():
    backend = _float64_backend("sdxl")
    config = TIConfig(steps=2, batch_size=3, templates="object")
    latents = _latents(3, seed=1)
    init = initial_vectors(backend, config)
    want = _reference(backend, latents, init, config)
    got = train_embeddings(backend, latents, init, config, _generators(3))
    assert {k: tuple(v.shape) for k, v in got.items()} == {"clip_l": (3, 1, 768), "clip_g": (3, 1, 1280)}
    _assert_close(got, want, init)


def test_rows_follow_their_own_generator(sd1_f64):
    """Permuting the images together with their generators permutes the trained rows, nothing else."""
    config = TIConfig(steps=2, batch_size=3)
    latents = _latents(3, seed=2)
    init = initial_vectors(sd1_f64, config)
    got = train_embeddings(sd1_f64, latents, init, config, _generators(3))["clip_l"]
    order = [2, 0, 1]
    gens = _generators(3)
    swapped = train_embeddings(sd1_f64, latents[order], init, config, [gens[i] for i in order])["clip_l"]
    torch.testing.assert_close(swapped, got[order], atol=ATOL, rtol=0)
    assert (got[0] - got[1]).abs().max() > 1e-4  # rows really differ


def test_each_row_gets_its_own_images_gradient(sd1_backend):
    """Gradient of the summed batched loss w.r.t. row i == gradient of image i's loss alone (not scaled)."""
    init = initial_vectors(sd1_backend, TIConfig(n_vectors=2))
    m = 3
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(m, 4, 8, 8, generator=g)
    noise = torch.randn(m, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    prompts = [TEMPLATES["style"][i].format(PLACEHOLDER) for i in (0, 4, 9)]
    base = init["clip_l"] + 0.01 * torch.randn(m, *init["clip_l"].shape, generator=g)
    batched = base.clone().requires_grad_(True)
    diffusion_loss(sd1_backend, x0, t, noise, prompts, {"clip_l": batched}).sum().backward()
    for i in range(m):
        row = base[i:i + 1].clone().requires_grad_(True)
        diffusion_loss(sd1_backend, x0[i:i + 1], t[i:i + 1], noise[i:i + 1], prompts[i:i + 1],
                       {"clip_l": row}).sum().backward()
        assert row.grad.norm() > 0
        torch.testing.assert_close(batched.grad[i], row.grad[0], rtol=1e-4, atol=1e-7)


def test_progress_counts_every_step_and_can_cancel(sd1_backend):
    config = TIConfig(steps=2, batch_size=2)
    init = initial_vectors(sd1_backend, config)
    calls = []
    train_embeddings(sd1_backend, _latents(3), init, config, _generators(3), lambda d, t: calls.append((d, t)))
    assert calls == [(i, 4) for i in range(1, 5)]  # ceil(3 / 2) chunks x 2 steps

    def cancel(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_embeddings(sd1_backend, _latents(3), init, config, _generators(3), cancel)


def test_bad_config_and_generators(sd1_backend):
    for kwargs, flag in [({"steps": 0}, "invalid steps"), ({"lr": 0.0}, "invalid learning rate"),
                         ({"batch_size": 0}, "invalid batch size"),
                         ({"n_vectors": 0}, "invalid vectors"), ({"templates": "faces"}, "invalid templates")]:
        with pytest.raises(PrivdiffError, match=flag):
            TIConfig(**kwargs)
    config = TIConfig(steps=1)
    with pytest.raises(ValueError, match="one generator per image"):
        train_embeddings(sd1_backend, _latents(2), initial_vectors(sd1_backend, config), config, _generators(1))


def test_training_generators_are_seeded_from_the_secure_stream():
    from privdiff.embeddings.textual_inversion import training_generator
    from privdiff.privacy.randomness import SecureRandom

    rng = SecureRandom(8)
    a, b = training_generator(rng), training_generator(rng)
    assert a.device.type == "cpu"
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
    seed = int.from_bytes(SecureRandom(8).random_bytes(8), "little")
    assert torch.equal(torch.randn(8, generator=training_generator(SecureRandom(8))),
                       torch.randn(8, generator=torch.Generator().manual_seed(seed)))
    gens = [training_generator(SecureRandom(s)) for s in (5, 5 + 2**32, 5 + 2**40)]  # differ only in high bits
    assert len({tuple(torch.randn(4, generator=g).tolist()) for g in gens}) == 3
