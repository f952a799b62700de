"""Spectral DP generation against DP-SGD over full-resolution tokens (arXiv 2602.23262's comparison, in miniature).

One public set (procedural shapes in the public styles, 32 px) and one private set (a held-out style the
public data never shows), the same prior shape (width, depth, heads), the same steps, batch, clip and ε:
  - **spectral**: the prior models only the coarse Haar scales (a 16 px image, 3 scales of 4x4 tokens); its
    samples are upsampled bicubically to 32 px (public post-processing),
  - **full-res**: the paper's baseline idea, the prior models every scale of the 32 px image (4 scales),
  - each one as the public prior alone, DP-SGD fine-tuned at ε (``privdiff.wavelet.training.finetune``, σ from
    ``plan_finetune``), and fine-tuned without privacy (ε = ∞, same steps and batch: the ceiling).
Both tokenizers share codebooks: the 16 px tokenizer's are the 32 px tokenizer's first three scales, halved
(with orthonormal Haar filters the bands of the 16 px block mean are those of the 32 px image divided by 2).

Utility is a distribution distance that needs no downloaded network: the sliced Wasserstein distance over
Laplacian-pyramid patches (Karras et al. 2018, "Progressive growing of GANs", section 5), between samples and
held-out private images; lower is better. The round trips through the tokenizers (real images in, decoded
images out) and a second draw of real images give each method's floor and the estimator's floor.

Step time: the DP-SGD step of the library's ``finetune`` (Poisson batch of expected size B) against the
non-private step of the same model (batch B, ``pretrain``), both from the runs above (medians), and a breakdown
of one DP step at batch B (forward + backward with per-sample gradients through torch's ExpandedWeights, the clip and
sum, its exact discrete Gaussian noise over every parameter, which is drawn one step ahead in a background thread
so only the wait for it counts, the Adam step), timed alternately with a plain step. The breakdown leaves out
the background draw's own CPU time (free when a core is idle, as with a GPU or torch on one thread); the run
medians include whatever it costs the step.
The last line is the ratio of the DP spectral method's distance to the DP full-res baseline's (below 1: the
spectral method is closer to the private distribution).

    python bench/wavelet_vs_dpsgd.py [--quick] [--epsilon 10] [--dp-steps 80] [--private 500]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModuleExpandedWeights

from privdiff.privacy.dpsgd import PrivdiffDPOptimizer, microbatch_size
from privdiff.privacy.randomness import SecureRandom
from privdiff.reference.shapes import public_dataset, style_images
from privdiff.release.dp_params import DPParams
from privdiff.wavelet.prior import PriorConfig, SpectralPrior
from privdiff.wavelet.tokenizer import SpectralTokenizer, fit_tokenizer
from privdiff.wavelet.training import TrainConfig, finetune, per_sample_gradients, plan_finetune, pretrain

STYLE = "teal stripes"
SIZE, COARSE, BASE = 32, 16, 4
DELTA = 1e-5

# ---------------------------------------------------------------------------------------------------------------
# Sliced Wasserstein distance over Laplacian-pyramid patches (Karras et al. 2018, section 5 and their code).
# Each image is split into a Laplacian pyramid (5x5 binomial filter; levels 32, 16 and the 8 px Gaussian rest);
# from each level, `patches` random 7x7 neighbourhoods per image become 147-dimensional descriptors. Both sets are
# normalised per level and channel with the **real** set's mean and std (Karras normalise each set by its own
# statistics, which would hide a global colour shift: here the style's background colour is half of the style).
# The distance per level is the mean, over 512 random unit directions (4 repeats of 128), of the 1-D Wasserstein-1
# distance between the sorted projections of equally many descriptors; reported x 1e3 as in the paper.
# ---------------------------------------------------------------------------------------------------------------

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16


def _blur(x: torch.Tensor) -> torch.Tensor:
    kernel = (_BINOMIAL[:, None] * _BINOMIAL[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[band at full size, band at half size, ..., Gaussian rest] of images [B,C,H,W] (float64)."""
    x, out = images.to(torch.float64), []
    for _ in range(levels - 1):
        down = _blur(x)[..., ::2, ::2]
        up = torch.zeros_like(x)
        up[..., ::2, ::2] = 4 * down
        out.append(x - _blur(up))
        x = down
    return out + [x]


def _descriptors(level: torch.Tensor, patches: int, generator: torch.Generator, side: int = 7) -> torch.Tensor:
    """``patches`` random side x side neighbourhoods per image of one level [B,C,h,w] → [B·patches, C·side²]."""
    b, c, h, w = level.shape
    side = min(side, h, w)
    ys = torch.randint(h - side + 1, (b, patches), generator=generator)
    xs = torch.randint(w - side + 1, (b, patches), generator=generator)
    offsets = torch.arange(side)
    rows = (ys[..., None] + offsets)[..., :, None].expand(b, patches, side, side)
    cols = (xs[..., None] + offsets)[..., None, :].expand(b, patches, side, side)
    picked = level[torch.arange(b)[:, None, None, None], :, rows, cols]  # [B, patches, side, side, C]
    return picked.permute(0, 1, 4, 2, 3).reshape(b * patches, c * side * side)


def _sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, repeats: int = 4,
                        directions: int = 128) -> float:
    total = 0.0
    for _ in range(repeats):
        d = torch.randn(a.shape[1], directions, generator=generator, dtype=torch.float64)
        d /= d.norm(dim=0, keepdim=True)
        pa, pb = (a @ d).sort(dim=0).values, (b @ d).sort(dim=0).values
        total += float((pa - pb).abs().mean())
    return total / repeats


def swd(real: torch.Tensor, fake: torch.Tensor, levels: int = 3, patches: int = 64, seed: int = 0) -> list[float]:
    """SWD x 1e3 per pyramid level (finest first) between image sets [N,3,H,W] in 0..1 (equal N)."""
    if len(real) != len(fake):
        raise ValueError(f"SWD compares equally many images, got {len(real)} and {len(fake)}")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for lr, lf in zip(laplacian_pyramid(real, levels), laplacian_pyramid(fake, levels), strict=True):
        dr, df = _descriptors(lr, patches, generator), _descriptors(lf, patches, generator)
        channels = lr.shape[1]
        per_channel = dr.view(len(dr), channels, -1)
        mean = per_channel.mean(dim=(0, 2)).repeat_interleave(per_channel.shape[2])
        std = per_channel.std(dim=(0, 2)).repeat_interleave(per_channel.shape[2]).clamp(min=1e-8)
        out.append(1e3 * _sliced_wasserstein((dr - mean) / std, (df - mean) / std, generator))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training, timing, sampling
# ---------------------------------------------------------------------------------------------------------------


class Ticker:
    """A progress callback that records the wall time of each step (the first, which includes set-up, is dropped)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.steps: list[float] = []

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.steps.append(now - self.last)
        self.last = now

    @property
    def median(self) -> float:
        return statistics.median(self.steps[1:] or self.steps)

    @property
    def total(self) -> float:
        return sum(self.steps)


@dataclass
class Method:
    """One tokenizer and its priors (public, DP fine-tuned, non-private fine-tuned)."""

    name: str
    tokenizer: SpectralTokenizer
    priors: dict[str, SpectralPrior]
    times: dict[str, Ticker]
    sigma: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _to_size(images: torch.Tensor) -> torch.Tensor:
    """Decoded images at the comparison size: coarse ones upsampled bicubically (public post-processing)."""
    if images.shape[-1] == SIZE:
        return images
    return F.interpolate(images, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)


def sample(method: Method, key: str, n: int, seed: int) -> torch.Tensor:
    tokens = method.priors[key].sample(n, torch.Generator().manual_seed(seed))
    return _to_size(method.tokenizer.decode(tokens))


def train(method: Method, public: torch.Tensor, private: torch.Tensor, args: argparse.Namespace) -> None:
    """Pre-train on public tokens; fine-tune copies with DP-SGD and without privacy (same steps and batch)."""
    tokenizer = method.tokenizer
    public_tokens, private_tokens = tokenizer.encode(public), tokenizer.encode(private)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # weight init of a public model: the same for both methods' shared parts
        prior = SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=args.dim, layers=args.layers, heads=args.heads))
    method.times["pretrain"] = Ticker()
    pretrain(prior, public_tokens, TrainConfig(args.pretrain_steps, args.batch, args.lr), seed=0,
             progress=method.times["pretrain"])
    method.priors["public"] = prior
    n = len(private)
    params = DPParams(epsilon=args.epsilon, delta=DELTA, sample_rate=args.dp_batch / n, clip_norm=args.clip)
    config = TrainConfig(args.dp_steps, args.dp_batch, args.dp_lr)
    report = plan_finetune(params, n, config, dataset_label=f"bench: generated '{STYLE}' style")
    method.times["dp"] = Ticker()
    method.priors["dp"] = finetune(copy.deepcopy(prior), private_tokens, params, config, report,
                                   progress=method.times["dp"])
    method.times["plain"] = Ticker()
    method.priors["plain"] = copy.deepcopy(prior)
    pretrain(method.priors["plain"], private_tokens, config, seed=1, progress=method.times["plain"])
    method.sigma = report.noise_multiplier
    method.losses = {"public data": _loss(prior, public_tokens)} | {
        key: _loss(method.priors[key], private_tokens) for key in ("public", "dp", "plain")}
    print(f"  {method.name}: trained in {sum(t.total for t in method.times.values()):.0f} s", file=sys.stderr)


@torch.no_grad()
def _loss(prior: SpectralPrior, tokens: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats per token) of up to 256 sequences."""
    return float(prior.loss(tokens[:256]).mean())


def breakdown(prior: SpectralPrior, tokens: torch.Tensor, sigma: float, args: argparse.Namespace,
              repeats: int) -> dict[str, float]:
    """Median seconds of a plain step and of a DP step's parts at batch B, timed alternately."""
    plain = copy.deepcopy(prior).train()
    plain_opt = torch.optim.Adam(plain.parameters(), lr=args.dp_lr)
    private = copy.deepcopy(prior).train()
    module = GradSampleModuleExpandedWeights(private, loss_reduction="sum")
    dp_opt = PrivdiffDPOptimizer(torch.optim.Adam(module.parameters(), lr=args.dp_lr), rng=SecureRandom(),
                                 noise_multiplier=sigma, max_grad_norm=args.clip, expected_batch_size=args.dp_batch)
    generator = torch.Generator().manual_seed(2)
    size = microbatch_size(args.dp_batch)  # as finetune computes them
    times: dict[str, list[float]] = {}

    def tick(name: str, start: float) -> float:
        now = time.perf_counter()
        times.setdefault(name, []).append(now - start)
        return now

    for _ in range(repeats + 1):  # the first round warms up and is dropped
        batch = tokens[torch.randint(len(tokens), (args.dp_batch,), generator=generator)]
        t = time.perf_counter()
        plain_opt.zero_grad(set_to_none=True)
        plain.loss(batch).sum().backward()
        t = tick("plain: forward + backward", t)
        plain_opt.step()
        tick("plain: Adam", t)
        t = time.perf_counter()
        dp_opt.zero_grad(set_to_none=True)
        per_sample_gradients(module, batch, size)
        t = tick("DP: forward + backward, per-sample gradients (ExpandedWeights)", t)
        dp_opt.clip_and_accumulate()
        t = tick("DP: clip (rigorous norm bounds) and sum in float64", t)
        dp_opt.add_noise()
        t = tick("DP: exact discrete Gaussian noise (wait for the draw made ahead)", t)
        dp_opt.scale_grad()
        dp_opt.original_optimizer.step()
        tick("DP: Adam", t)
        dp_opt.noise.wait()  # the next draw is not left running while the plain step is timed
    module._close()
    dp_opt.close()
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (tiny sizes, meaningless figures)")
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--public", type=int, default=1000, help="public images (pre-training)")
    parser.add_argument("--tokenizer-images", type=int, default=300, help="public images the codebooks are fit on")
    parser.add_argument("--codebook", type=int, default=256, help="codes per scale")
    parser.add_argument("--private", type=int, default=500, help="private training images N")
    parser.add_argument("--heldout", type=int, default=256, help="held-out private images (and samples per model)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32, help="pre-training batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="pre-training learning rate")
    parser.add_argument("--dp-steps", type=int, default=80)
    parser.add_argument("--dp-batch", type=int, default=64, help="expected DP batch B (q = B / N)")
    parser.add_argument("--dp-lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="per-sample clip norm C")
    parser.add_argument("--repeats", type=int, default=3, help="DP step breakdown: timed rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier times on shared cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.public, args.tokenizer_images, args.codebook, args.private, args.heldout = 200, 60, 32, 100, 32
        args.pretrain_steps, args.dp_steps, args.dp_batch, args.repeats = 40, 4, 16, 2
    start = time.perf_counter()

    public = _to_tensor(public_dataset(args.public, seed=0)[0])
    private = _to_tensor(style_images(STYLE, args.private, seed=0)[0])
    heldout = _to_tensor(style_images(STYLE, args.heldout, seed=1)[0])
    second_draw = private[: args.heldout]
    full_tokenizer = fit_tokenizer(public[: args.tokenizer_images], SIZE, BASE, args.codebook, iterations=15)
    coarse_tokenizer = SpectralTokenizer(COARSE, BASE, tuple(c / 2 for c in full_tokenizer.codebooks[:3]))
    tokenizer_s = time.perf_counter() - start
    methods = [Method("spectral", coarse_tokenizer, {}, {}), Method("full-res", full_tokenizer, {}, {})]
    for method in methods:
        train(method, public, private, args)

    rows: list[tuple[str, str, str, list[float]]] = [
        ("real private images (second draw)", "-", "-", swd(heldout, second_draw))]
    for method in methods:
        round_trip = _to_size(method.tokenizer.decode(method.tokenizer.encode(heldout)))
        rows.append((f"{method.name} tokenizer round trip", "-", "-", swd(heldout, round_trip)))
    for key, label, eps in (("public", "public prior alone", "-"), ("plain", "fine-tuned, not private", "inf"),
                            ("dp", "DP-SGD fine-tuned", f"{args.epsilon:g}")):
        for method in methods:
            samples = sample(method, key, args.heldout, seed=3)
            rows.append((f"{method.name}: {label}", str(method.tokenizer.length), eps, swd(heldout, samples)))
    stats = {m.name: breakdown(m.priors["public"], m.tokenizer.encode(private), m.sigma, args, args.repeats)
             for m in methods}
    elapsed = time.perf_counter() - start

    print(f"\nspectral vs full-res DP-SGD: style '{STYLE}', N = {args.private} private, {args.public} public, "
          f"{args.heldout} held-out and samples; prior {args.dim} wide x {args.layers} layers; pre-training "
          f"{args.pretrain_steps} x {args.batch}; fine-tuning {args.dp_steps} steps, expected batch {args.dp_batch} "
          f"(q = {args.dp_batch / args.private:.3g}), C = {args.clip:g}, delta = {DELTA:g}; {elapsed:.0f} s "
          f"(tokenizer {tokenizer_s:.0f} s)")
    for m in methods:
        loss = m.losses
        print(f"{m.name}: {m.tokenizer.length} tokens, {sum(p.numel() for p in m.priors['public'].parameters())} "
              f"parameters, sigma {m.sigma:.3f}; NLL nats/token: public data {loss['public data']:.3f}, private data "
              f"under the public prior {loss['public']:.3f}, DP {loss['dp']:.3f}, non-private {loss['plain']:.3f}")
    print("SWD x 1e3 over Laplacian-pyramid 7x7 patches against held-out private images (lower is closer)")
    print(f"{'':<44} {'tokens':>6} {'eps':>5} {'32 px':>7} {'16 px':>7} {'8 px':>7} {'mean':>7}")
    for label, tokens, eps, levels in rows:
        cells = " ".join(f"{v:7.1f}" for v in levels)
        print(f"{label:<44} {tokens:>6} {eps:>5} {cells} {statistics.mean(levels):7.1f}")
    print(f"train step time, median (batch {args.batch} pre-training, expected batch {args.dp_batch} fine-tuning):")
    print(f"{'':<12} {'pre-train':>10} {'non-private':>12} {'DP-SGD':>10} {'DP/non-private':>15} {'DP run':>8}")
    for m in methods:
        t = m.times
        print(f"{m.name:<12} {t['pretrain'].median * 1e3:8.1f}ms {t['plain'].median * 1e3:10.1f}ms "
              f"{t['dp'].median * 1e3:8.1f}ms {t['dp'].median / t['plain'].median:15.1f} {t['dp'].total:7.0f}s")
    print(f"one step at batch {args.dp_batch} (per-sample gradients {microbatch_size(args.dp_batch)} at a time), "
          f"parts timed alternately (median of {args.repeats}), ms:")
    print(f"{'':<68} " + " ".join(f"{m.name:>9}" for m in methods))
    for part in stats[methods[0].name]:
        print(f"  {part:<66} " + " ".join(f"{stats[m.name][part] * 1e3:9.1f}" for m in methods))
    for m in methods:
        s = stats[m.name]
        plain = sum(v for k, v in s.items() if k.startswith("plain"))
        dp = sum(v for k, v in s.items() if k.startswith("DP"))
        noise = s["DP: exact discrete Gaussian noise (wait for the draw made ahead)"]
        print(f"  {m.name}: DP step {dp * 1e3:.1f} ms / plain {plain * 1e3:.1f} ms = {dp / plain:.1f}x; "
              f"without the noise {(dp - noise) / plain:.1f}x")
    spectral, full = (statistics.mean(rows[-2 + i][3]) for i in range(2))
    print(f"ratio spectral/full-res SWD at eps={args.epsilon:g}: {spectral / full:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
