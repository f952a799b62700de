"""The DP-SGD baseline: opacus per-sample gradients of the shared vectors, clipping, a full run."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from privdiff.demo.data import write_style_images
from privdiff.embeddings import dpsgd_ti
from privdiff.embeddings.dpsgd_ti import SharedVectors, run_dpsgd_ti
from privdiff.embeddings.templates import TEMPLATES
from privdiff.embeddings.textual_inversion import PLACEHOLDER, TIConfig, diffusion_loss, initial_vectors
from privdiff.errors import PrivdiffError
from privdiff.io.images import load_image_folder
from privdiff.privacy import dpsgd
from privdiff.privacy.accountants import epsilon_for
from privdiff.privacy.dpsgd import PrivdiffDPOptimizer, microbatch_size
from privdiff.privacy.mechanism import _row_norm_bounds, bound_vectors, clipped_sum
from privdiff.privacy.randomness import NoiseAhead, SecureRandom
from privdiff.release.dp_params import DPParams

B = 3


def _batch(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, 8, 8, generator=g)
    noise = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([50, 400, 900])
    prompts = [TEMPLATES["style"][i].format(PLACEHOLDER) for i in (1, 3, 8)]
    return x0, t, noise, prompts


# opacus hooks a module whose input (the latents) needs no gradient; torch says so each time. run_dpsgd_ti
# silences it itself; only the tests that drive GradSampleModule directly filter it.
hook_warning_ignored = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _per_sample_grads(backend, weight, seed=0):
    """Per-example gradients through opacus' GradSampleModule, with the loss reduced as run_dpsgd_ti does."""
    module = GradSampleModule(SharedVectors(weight))
    x0, t, noise, prompts = _batch(backend, seed)
    vectors = {"clip_l": module(x0)}
    diffusion_loss(backend, x0, t, noise, prompts, vectors).mean().backward()
    return module


@hook_warning_ignored
def test_grad_sampler_gives_each_examples_own_gradient(sd1_backend):
    init = initial_vectors(sd1_backend, TIConfig(n_vectors=2))["clip_l"]
    module = _per_sample_grads(sd1_backend, init)
    grad_sample = module._module.weight.grad_sample
    assert grad_sample.shape == (B, 2, 768)
    x0, t, noise, prompts = _batch(sd1_backend)
    for b in range(B):
        w = init.clone().requires_grad_(True)
        loss = diffusion_loss(sd1_backend, x0[b:b + 1], t[b:b + 1], noise[b:b + 1], prompts[b:b + 1],
                              {"clip_l": w.unsqueeze(0)})
        (grad,) = torch.autograd.grad(loss.sum(), w)
        assert grad.norm() > 0
        torch.testing.assert_close(grad_sample[b], grad, rtol=1e-4, atol=1e-7)
    # The ordinary gradient is still the batch mean.
    torch.testing.assert_close(module._module.weight.grad, grad_sample.mean(0), rtol=1e-5, atol=1e-8)


@hook_warning_ignored
def test_dp_optimizer_clips_each_example_to_c(sd1_backend):
    init = initial_vectors(sd1_backend, TIConfig())["clip_l"]
    module = _per_sample_grads(sd1_backend, init, seed=1)
    grad_sample = module._module.weight.grad_sample.clone()
    norms = grad_sample.flatten(1).norm(dim=1)
    clip = float(norms.median())  # one example below C, one above: both branches of the clip
    assert norms.min() < clip < norms.max() or norms.min() == clip
    optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=1.0), noise_multiplier=0.0,
                            max_grad_norm=clip, expected_batch_size=B)
    optimizer.pre_step()
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)  # opacus' clip factor (1e-6 guards a zero norm)
    want = (grad_sample * scale[:, None, None]).sum(0)
    weight = module._module.weight
    atol = 1e-5 * float(want.abs().max())
    torch.testing.assert_close(weight.summed_grad, want, rtol=1e-4, atol=atol)
    torch.testing.assert_close(weight.grad, want / B, rtol=1e-4, atol=atol / B)
    clipped = grad_sample * scale[:, None, None]
    assert bool((clipped.flatten(1).norm(dim=1) <= clip * (1 + 1e-5)).all())


@hook_warning_ignored
def test_privdiff_optimizer_clips_in_float64_and_adds_grid_noise(sd1_backend):
    init = initial_vectors(sd1_backend, TIConfig())["clip_l"]
    module = _per_sample_grads(sd1_backend, init, seed=1)
    weight = module._module.weight
    grad_sample = weight.grad_sample.clone()
    clip = float(grad_sample.flatten(1).norm(dim=1).median())
    sigma = 2.0
    optimizer = PrivdiffDPOptimizer(torch.optim.SGD(module.parameters(), lr=1.0), rng=SecureRandom(3),
                                     noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=B)
    optimizer.pre_step()
    want = bound_vectors(grad_sample.flatten(1), clip).sum(0).view_as(weight)
    assert weight.summed_grad.dtype == torch.float64
    torch.testing.assert_close(weight.summed_grad, want, rtol=2.0**-11, atol=2.0**-11 * float(want.abs().max()))
    assert weight.grad.dtype == weight.dtype
    noisy = weight.grad.double() * B  # scale_grad divided by the expected batch size
    assert (noisy - want).std().item() == pytest.approx(sigma * clip, rel=0.1)


def test_run_dpsgd_ti(tmp_path, sd1_backend, monkeypatch, recwarn):
    write_style_images(tmp_path / "imgs", count=4, size=32)
    images = load_image_folder(tmp_path / "imgs", 32)[1]
    made, noised, sampled = [], [], []

    class SpyOptimizer(PrivdiffDPOptimizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def spy_noisy_sum(total, clip_norm, noise_multiplier, rng):
        noised.append((total.dtype, clip_norm, noise_multiplier, type(rng)))
        return real_noisy_sum(total, clip_norm, noise_multiplier, rng)

    def spy_poisson(n, q, rng):
        sampled.append(type(rng))
        return real_poisson(n, q, rng)

    real_noisy_sum, real_poisson = dpsgd.noisy_sum, dpsgd_ti.poisson_sample
    monkeypatch.setattr(dpsgd_ti, "PrivdiffDPOptimizer", SpyOptimizer)
    monkeypatch.setattr(dpsgd, "noisy_sum", spy_noisy_sum)
    monkeypatch.setattr(dpsgd_ti, "poisson_sample", spy_poisson)
    steps = []
    # A given sigma (its epsilon computed) keeps the test fast: calibrating at q < 1 takes seconds.
    params = DPParams(epsilon=None, delta=1e-3, sample_rate=0.5, clip_norm=0.3, accountant="prv",
                      noise_multiplier=1.0)
    config = TIConfig(steps=3, batch_size=2)
    result = run_dpsgd_ti(sd1_backend, images, params, config, progress=lambda d, t: steps.append((d, t)))
    report = result.report
    assert report.steps == 3 and "DP-SGD" in report.mechanism and report.sample_rate == 0.5
    assert report.noise_multiplier == 1.0 and report.private and result.expected_snr is None
    assert report.epsilon == pytest.approx(epsilon_for(1.0, 0.5, 3, 1e-3, accountant="prv")[1])
    assert steps == [(1, 3), (2, 3), (3, 3)]
    (opt,) = made
    assert opt.max_grad_norm == 0.3 and opt.noise_multiplier == report.noise_multiplier
    assert opt.expected_batch_size == 2 and isinstance(opt.rng, SecureRandom) and not opt.rng.reproducible
    assert noised == [(torch.float64, 0.3, 1.0, NoiseAhead)] * 3  # every step's noise: one noisy_sum
    assert not opt.noise.rng.reproducible and opt.noise._next is None  # its thread stopped with training
    assert sampled == [SecureRandom] * 3
    vec = result.embedding.vectors["clip_l"]
    init = initial_vectors(sd1_backend, config)["clip_l"]
    assert vec.shape == (1, 768) and torch.isfinite(vec).all()
    assert (vec - init).abs().max() > 1e-3  # three Adam steps moved it
    assert not [w for w in recwarn if "Full backward hook" in str(w.message)]


def test_dpsgd_silences_only_the_hook_warning(tmp_path, sd1_backend):
    write_style_images(tmp_path / "imgs", count=2, size=32)
    images = load_image_folder(tmp_path / "imgs", 32)[1]
    params = DPParams(epsilon=None, noise_multiplier=1.0, delta=1e-3, sample_rate=1.0, accountant="rdp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dpsgd_ti(sd1_backend, images, params, TIConfig(steps=1), seed=0)
        warnings.warn("still shown", UserWarning, stacklevel=1)  # the filter is scoped to the training loop
    messages = [str(w.message) for w in caught]
    assert "still shown" in messages
    assert not [m for m in messages if "Full backward hook" in m]


def test_dpsgd_refuses_normalize_before_any_work():
    params = DPParams(epsilon=1.0, delta=1e-3, bound="normalize")
    with pytest.raises(PrivdiffError, match="bound 'normalize' is not available for dpsgd"):
        run_dpsgd_ti(object(), torch.zeros(0), params)  # a backend that cannot do anything


def test_dpsgd_survives_empty_poisson_batches(tmp_path, sd1_backend):
    write_style_images(tmp_path / "imgs", count=2, size=32)
    images = load_image_folder(tmp_path / "imgs", 32)[1]
    params = DPParams(epsilon=None, noise_multiplier=1.0, delta=1e-3, sample_rate=0.01, accountant="rdp")
    result = run_dpsgd_ti(sd1_backend, images, params, TIConfig(steps=2), seed=0)
    assert torch.isfinite(result.embedding.vectors["clip_l"]).all() and not result.report.private


def test_dpsgd_sdxl_widths(tmp_path, sdxl_backend):
    write_style_images(tmp_path / "imgs", count=2, size=32)
    images = load_image_folder(tmp_path / "imgs", 32)[1]
    params = DPParams(epsilon=2.0, delta=1e-3, sample_rate=1.0, accountant="rdp")
    result = run_dpsgd_ti(sdxl_backend, images, params, TIConfig(steps=1), seed=0)
    shapes = {k: tuple(v.shape) for k, v in result.embedding.vectors.items()}
    assert shapes == {"clip_l": (1, 768), "clip_g": (1, 1280)}


def test_microbatch_size_is_a_power_of_two_near_a_quarter_of_the_expected_batch():
    assert [microbatch_size(b) for b in (0.2, 1, 3, 4, 5, 8, 64, 65, 100)] == [1, 1, 1, 1, 2, 2, 16, 32, 32]


def _examples(backend, count, seed=0):
    """``count`` examples (latent, timestep, noise, prompt): example 0 is the one every batch shares."""
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(count, 4, 8, 8, generator=g), torch.randn(count, 4, 8, 8, generator=g)
    t = torch.randint(len(backend.alphas_cumprod), (count,), generator=g)
    prompts = [TEMPLATES["style"][i % len(TEMPLATES["style"])].format(PLACEHOLDER) for i in range(count)]
    return x0, t, noise, prompts


def _ti_rows(backend, init, examples, order, size):
    """The per-sample gradients of ``examples`` taken in ``order``, as run_dpsgd_ti computes them."""
    module = GradSampleModule(SharedVectors(init), loss_reduction="sum")
    x0, t, noise, prompts = examples
    dpsgd_ti.per_sample_gradients(backend, module, [init.shape[-1]], ["clip_l"], size, x0[order], t[order],
                                  noise[order], [prompts[i] for i in order])
    return module._module.weight.grad_sample


@hook_warning_ignored
def test_an_examples_gradient_is_the_same_in_any_poisson_batch(sd1_backend):
    """Example 0's per-sample gradient and its norm bound (so its clipped row) are bit-identical alone, in a pair, or
    anywhere among many."""
    init = initial_vectors(sd1_backend, TIConfig(n_vectors=2))["clip_l"]
    examples = _examples(sd1_backend, 7)
    size = 3
    alone = _ti_rows(sd1_backend, init, examples, [0], size)[0]
    assert alone.norm() > 0
    (bound,), _ = _row_norm_bounds([alone.flatten()[None]])  # what clipped_sum scales the row by
    for order in ([1, 0], [0, 1], [2, 3, 4, 5, 6, 1, 0], [3, 4, 0, 1, 2, 5], [1, 2, 3, 4, 5, 6, 0]):
        rows = _ti_rows(sd1_backend, init, examples, order, size)
        assert rows.shape == (len(order), *init.shape)
        position = order.index(0)
        assert torch.equal(rows[position], alone), order
        bounds, _ = _row_norm_bounds([rows.flatten(1)])  # among the others: the same bound, so the same clipped row
        assert torch.equal(bounds[position], bound), order


@hook_warning_ignored
def test_dummies_never_reach_the_noisy_sum(sd1_backend, monkeypatch):
    """A batch of 4 in microbatches of 3 (two dummies): the clipped sum is that of the 4 examples computed alone."""
    init = initial_vectors(sd1_backend, TIConfig())["clip_l"]
    examples = _examples(sd1_backend, 4, seed=2)
    size, clip = 3, 1e-3
    assert _ti_rows(sd1_backend, init, examples, [], size).shape == (0, *init.shape)  # an empty batch: no rows
    module = GradSampleModule(SharedVectors(init), loss_reduction="sum")
    seen = []
    real_sum = dpsgd.clipped_sum
    monkeypatch.setattr(dpsgd, "clipped_sum", lambda parts, c: seen.append(parts[0].clone()) or real_sum(parts, c))
    optimizer = PrivdiffDPOptimizer(torch.optim.SGD(module.parameters(), lr=1.0), rng=SecureRandom(3),
                                     noise_multiplier=1.0, max_grad_norm=clip, expected_batch_size=4)
    x0, t, noise, prompts = examples
    dpsgd_ti.per_sample_gradients(sd1_backend, module, [init.shape[-1]], ["clip_l"], size, x0, t, noise, prompts)
    optimizer.clip_and_accumulate()
    optimizer.close()
    singles = torch.cat([_ti_rows(sd1_backend, init, examples, [i], size) for i in range(4)])
    assert len(seen) == 1 and torch.equal(seen[0], singles)  # the 4 real rows, once, in order
    assert torch.equal(module._module.weight.summed_grad, clipped_sum([singles], clip)[0])
    # A dummy's own gradient is not zero: had it entered, the sum would show it.
    padded_alone = GradSampleModule(SharedVectors(init), loss_reduction="sum")
    vectors = {"clip_l": padded_alone(torch.zeros(1, 4, 8, 8))}
    diffusion_loss(sd1_backend, torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, 8, 8),
                   [PLACEHOLDER], vectors).sum().backward()
    assert padded_alone._module.weight.grad_sample.norm() > 0


def test_run_dpsgd_ti_computes_every_gradient_in_microbatches_of_one_shape(tmp_path, sd1_backend, monkeypatch):
    write_style_images(tmp_path / "imgs", count=6, size=32)
    images = load_image_folder(tmp_path / "imgs", 32)[1]
    shapes = []

    def spy_loss(backend, x0, t, noise, prompts, vectors):
        shapes.append((x0.shape[0], t.shape[0], noise.shape[0], len(prompts), vectors["clip_l"].shape[0]))
        return diffusion_loss(backend, x0, t, noise, prompts, vectors)

    monkeypatch.setattr(dpsgd_ti, "diffusion_loss", spy_loss)
    params = DPParams(epsilon=None, noise_multiplier=1.0, delta=1e-3, sample_rate=0.9, accountant="rdp")
    run_dpsgd_ti(sd1_backend, images, params, TIConfig(steps=3, batch_size=8), seed=1)
    size = microbatch_size(round(0.9 * 6))  # 2: below the batch size 8, which would otherwise cap it
    assert size == 2 and shapes and set(shapes) == {(size,) * 5}
