"""Claimed ε against the one-run audit's lower bound, for every kind of release privdiff makes.

Each row is one audit (``privdiff.audit``): one run of the release's own code with M canaries, each in with
probability 1/2, and the bound at 95% from the best of the fixed guess counts (Bonferroni-corrected). The releases:
  - **DPAgg** (the aggregate DPAgg-TI releases): N = 100 per-image offsets (embeddings of 2 vectors, 1536 wide) plus
    the included canaries, offsets of norm C in orthogonal directions, q = 1: the mechanism with canaries the attack
    isolates perfectly (1536 dimensions hold M = 1000 orthogonal canaries; 768 would not),
  - **DPAgg-TI** on the small reference model: 20 private images of a held-out style plus canary mosaics, per-image
    textual inversion (40 steps), C = 4, q = 1; the attacker trains each canary's own embedding,
  - **style target** (DP Universal Guidance) with the small model's public image encoder: 50 private images,
  - **spectral DP-SGD**: a small public prior (16 px, 3 scales) fine-tuned on 32 private images, full batch, 30 steps;
    the attack is each canary's loss drop,
at ε ∈ {1, 4, 16} and with the noise removed (a double injected into ``SecureRandom.discrete_gaussian`` for those
rows only: what a broken mechanism would give). Beside each row, **ideal**: the bound the same M reaches on the
Gaussian mechanism at the run's σ when every canary is isolated (scores N(1/σ, 1) in, N(0, 1) out, simulated with
the same bound code): the paper's idealised Gaussian setting, the most any attack could show at that M.
The last line is the ratio of the audited bound to the claimed ε for DPAgg at ε = 4 with M = 1000.

    python bench/audit.py [--quick] [--full]

``--quick`` runs M = 64 only; ``--full`` adds M = 256 for DPAgg-TI and the spectral prior (minutes each on two cores);
``--only NAME`` runs one release's rows.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from privdiff.audit import best_lower_bound
from privdiff.audit.aggregates import audit_aggregate, audit_dpagg_ti, audit_style_target
from privdiff.audit.result import AuditResult
from privdiff.audit.wavelet_finetune import audit_wavelet_finetune
from privdiff.demo.data import write_style_images
from privdiff.embeddings.files import Embedding
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.io.images import read_private_files
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.image_encoders import load_small_encoder
from privdiff.models.small import load_small
from privdiff.privacy.randomness import SecureRandom
from privdiff.reference.shapes import public_dataset, style_images
from privdiff.release.dp_params import DPParams
from privdiff.wavelet.prior import PriorConfig, SpectralPrior, save_prior
from privdiff.wavelet.tokenizer import fit_tokenizer
from privdiff.wavelet.training import TrainConfig, pretrain

DELTA = 1e-5
EPSILONS = (1.0, 4.0, 16.0, None)
"""None: the noise removed."""
STYLE = "teal stripes"
RELEASES = ("DPAgg", "DPAgg-TI (small model)", "style target (small encoder)", "spectral DP-SGD")
TI = TIConfig(steps=40, lr=2e-2, batch_size=50)
"""DPAgg-TI's per-image training (as in bench/privacy_utility.py and the demo)."""


@contextlib.contextmanager
def noise(epsilon: float | None) -> Iterator[None]:
    """The real mechanism, or (``epsilon`` None) every discrete Gaussian draw replaced by zero."""
    if epsilon is not None:
        yield
        return
    original = SecureRandom.discrete_gaussian
    SecureRandom.discrete_gaussian = lambda self, size, sigma: np.zeros(size, dtype=np.int64)
    try:
        yield
    finally:
        SecureRandom.discrete_gaussian = original


def ideal(canaries: int, sigma: float, seed: int = 0) -> float:
    """The bound of the Gaussian mechanism of noise multiplier ``sigma`` with ``canaries`` isolated canaries."""
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    return best_lower_bound(included / sigma + rng.normal(size=canaries), included, DELTA).epsilon_lower_bound


def _user_offsets(count: int = 100) -> list[Embedding]:
    g = torch.Generator().manual_seed(0)
    return [Embedding({"clip_l": 0.3 * torch.randn(2, 768, generator=g) / math.sqrt(1536)}) for _ in range(count)]


def _style(count: int, size: int | None = None) -> torch.Tensor:
    pixels, _ = style_images(STYLE, count, seed=100)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return images if size is None else torch.nn.functional.interpolate(images, size=(size, size), mode="area")


def _public_prior(folder: Path) -> Path:
    images = torch.from_numpy(public_dataset(400, seed=0)[0]).permute(0, 3, 1, 2).float()
    tokenizer = fit_tokenizer(images, size=16, base=4, codebook_size=32, iterations=10)
    torch.manual_seed(0)
    prior = SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=64, layers=2, heads=4))
    pretrain(prior, tokenizer.encode(images), TrainConfig(steps=200, batch_size=32, lr=1e-3))
    return save_prior(prior, tokenizer, folder / "public.safetensors")


Run = Callable[..., AuditResult]
"""``run(epsilon, canaries, seed)``: one audit of a release."""


def audits(workdir: Path, args: argparse.Namespace) -> Iterator[tuple[str, tuple[int, ...], Run]]:
    """Per release (``--only`` one): its name, the canary counts to run and ``run(epsilon, canaries, seed)``; each
    release's model is loaded when its turn comes."""
    many = (64,) if args.quick else (64, 256, 1000)
    slow = (64,) if args.quick or not args.full else (64, 256)

    def params(epsilon: float | None, **extra: float) -> DPParams:
        return DPParams(epsilon=epsilon or 1.0, delta=DELTA, **extra)

    def dpagg() -> Run:
        return lambda eps, m, seed: audit_aggregate(_user_offsets(), params(eps), m, seed=seed)

    def dpagg_ti() -> Run:
        small = DiffusersBackend(load_small())
        small.freeze()
        return lambda eps, m, seed: audit_dpagg_ti(small, _style(20), params(eps, clip_norm=4.0), TI, m, seed=seed)

    def style_target() -> Run:
        encoder = load_small_encoder()
        return lambda eps, m, seed: audit_style_target(encoder, _style(50, encoder.size),
                                                       params(eps, bound="normalize"), m, seed=seed)

    def spectral() -> Run:
        prior = _public_prior(workdir)
        private = read_private_files(write_style_images(workdir / "private", count=32, size=16))
        return lambda eps, m, seed: audit_wavelet_finetune(prior, private, params(eps, sample_rate=1.0),
                                                           TrainConfig(steps=30, lr=3e-2), m, seed=seed)

    for name, counts, make in zip(RELEASES, (many, slow, many, slow), (dpagg, dpagg_ti, style_target, spectral),
                                  strict=True):
        if args.only in (None, name):
            yield name, counts, make()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="M = 64 only")
    parser.add_argument("--full", action="store_true", help="also M = 256 for DPAgg-TI and the spectral prior")
    parser.add_argument("--seed", type=int, default=0, help="the audits' seed (runs are marked not private)")
    parser.add_argument("--only", choices=RELEASES, default=None, help="run only this release's rows")
    args = parser.parse_args(argv)
    logging.getLogger("privdiff").setLevel(logging.ERROR)  # the low signal-to-noise warnings of small runs
    headline = None
    print(f"{'release':30} {'M':>5} {'claimed eps':>11} {'sigma':>8} {'audited':>8} {'ideal':>6} "
          f"{'correct/guesses':>15} {'seconds':>8}")
    with tempfile.TemporaryDirectory(prefix="privdiff-audit-bench-") as tmp:
        for name, counts, run in audits(Path(tmp), args):
            for m in counts:
                for epsilon in EPSILONS:
                    start = time.perf_counter()
                    with noise(epsilon):
                        result = run(epsilon, m, args.seed)
                    seconds = time.perf_counter() - start
                    claimed = "no noise" if epsilon is None else f"{result.claimed_epsilon:g}"
                    reference = "-" if epsilon is None else f"{ideal(m, result.noise_multiplier, args.seed):.2f}"
                    print(f"{name:30} {m:5d} {claimed:>11} {result.noise_multiplier:8.3g} "
                          f"{result.epsilon_lower_bound:8.2f} {reference:>6} "
                          f"{result.correct:>7}/{result.guesses:<7} {seconds:8.1f}", flush=True)
                    if name == "DPAgg" and epsilon == 4.0 and m == 1000:
                        headline = result.epsilon_lower_bound / result.claimed_epsilon
    if headline is None:
        print("ratio audited/claimed eps (DPAgg, eps=4, M=1000): not run (--quick or --only)")
    else:
        print(f"ratio audited/claimed eps (DPAgg, eps=4, M=1000): {headline:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
