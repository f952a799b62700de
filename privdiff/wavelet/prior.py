"""The autoregressive prior: a small decoder-only transformer over spectral token sequences.

Position i predicts token i from tokens < i (a start token first). Inputs embed (scale, code) pairs from one
table with per-scale offsets, plus a learned position embedding and a scale embedding; the output head is
masked to the codebook of the position's scale. Built from Linear, Embedding and LayerNorm only, so opacus
computes exact per-sample gradients with its own hooks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from privdiff.errors import PrivdiffError
from privdiff.io.images import half_memory
from privdiff.io.untrusted import config_int, parse_json
from privdiff.io.untrusted_tensors import open_tensor_file
from privdiff.privacy.report import REPORT_KEY, PrivacyReport
from privdiff.wavelet.tokenizer import (
    MAX_BASE,
    MAX_CODES,
    SpectralTokenizer,
    check_codebooks,
    checked_tokenizer,
    codebook_dims,
    geometry,
    write_tensors,
)

KIND = "privdiff spectral prior"
SHAPE_RANGES = {"dim": (8, 4096), "layers": (1, 64), "heads": (1, 64)}
"""The prior shapes ``privdiff wavelet pretrain`` offers; a prior file's config must be one of them."""
MAX_SCALES = 11  # a 1024 px size over a base of 1: ten detail levels and the approximation


@dataclass(frozen=True)
class PriorConfig:
    """Shape of the prior; ``vocab_sizes`` and ``tokens_per_scale`` come from the tokenizer."""

    vocab_sizes: tuple[int, ...]
    tokens_per_scale: int
    dim: int = 128
    layers: int = 4
    heads: int = 4

    def __post_init__(self) -> None:
        sizes = self.vocab_sizes
        if not isinstance(sizes, tuple) or not 1 <= len(sizes) <= MAX_SCALES:
            raise PrivdiffError(f"vocab_sizes must be a list of 1..{MAX_SCALES} codebook sizes, got {sizes!r:.60}")
        for k, size in enumerate(sizes):
            config_int(size, f"vocab_sizes[{k}]", 1, MAX_CODES)
        config_int(self.tokens_per_scale, "tokens_per_scale", 1, MAX_BASE**2)
        for name, (low, high) in SHAPE_RANGES.items():
            config_int(getattr(self, name), name, low, high)
        if self.dim % self.heads:
            raise PrivdiffError(f"prior width {self.dim} is not a multiple of its {self.heads} heads")

    @property
    def length(self) -> int:
        return len(self.vocab_sizes) * self.tokens_per_scale

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every weight of :class:`SpectralPrior` (its ``state_dict``), computed without building it."""
        d, total = self.dim, sum(self.vocab_sizes)
        block = {"norm1.weight": (d,), "norm1.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                 "qkv.weight": (3 * d, d), "qkv.bias": (3 * d,), "proj.weight": (d, d), "proj.bias": (d,),
                 "fc1.weight": (4 * d, d), "fc1.bias": (4 * d,), "fc2.weight": (d, 4 * d), "fc2.bias": (d,)}
        shapes = {"tokens.weight": (total + 1, d), "positions.weight": (self.length, d),
                  "scale_embedding.weight": (len(self.vocab_sizes), d)}
        shapes |= {f"blocks.{i}.{name}": shape for i in range(self.layers) for name, shape in block.items()}
        return shapes | {"norm.weight": (d,), "norm.bias": (d,), "head.weight": (total, d), "head.bias": (total,)}

    def weight_count(self) -> int:
        """The number of weights (the sum over :meth:`state_shapes`, in closed form)."""
        d, total = self.dim, sum(self.vocab_sizes)
        block = 12 * d * d + 13 * d
        return d * (2 * total + 1 + self.length + len(self.vocab_sizes) + 2) + total + self.layers * block

    def memory(self, batch: int = 0, training: bool = False, per_sample: bool = False) -> int:
        """Bytes a prior of this shape needs, roughly: float32 weights and logit mask; with ``batch`` sequences,
        their activations (kept for backward when ``training``, which adds gradients and Adam's moments;
        ``per_sample`` adds DP-SGD's per-example gradients)."""
        total, n = sum(self.vocab_sizes), self.length
        weights = self.weight_count()
        need = weights * (4 if training else 1) + n * total
        kept = self.layers if training else 1
        need += batch * (n * (3 * total + 16 * self.dim * kept) + self.heads * n * n * kept)
        return 4 * (need + (batch * weights if per_sample else 0))

    @classmethod
    def for_tokenizer(cls, tokenizer: SpectralTokenizer, **shape: int) -> PriorConfig:
        return cls(tokenizer.vocab_sizes, tokenizer.tokens_per_scale, **shape)


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SpectralPrior(nn.Module):
    """p(tokens) = Π_i p(token_i | tokens_<i) over one tokenizer's sequences."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        sizes = torch.tensor(config.vocab_sizes)
        scales = torch.arange(len(sizes)).repeat_interleave(config.tokens_per_scale)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
        total = int(sizes.sum())
        self.register_buffer("offsets", offsets[scales], persistent=False)  # [L]
        self.register_buffer("scales", scales, persistent=False)
        allowed = torch.zeros(config.length, total, dtype=torch.bool)
        for i, s in enumerate(scales.tolist()):
            allowed[i, offsets[s]:offsets[s] + sizes[s]] = True
        self.register_buffer("logit_mask", torch.where(allowed, 0.0, -math.inf), persistent=False)
        self.tokens = nn.Embedding(total + 1, config.dim)  # + the start token
        self.positions = nn.Embedding(config.length, config.dim)
        self.scale_embedding = nn.Embedding(len(sizes), config.dim)
        self.blocks = nn.ModuleList(Block(config.dim, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, total)
        self.start = total

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Masked logits [B, n, total] for positions 0..n-1 given tokens[:, :n-1] (codebook indices)."""
        b, n = tokens.shape[0], tokens.shape[1] + 1
        start = torch.full((b, 1), self.start, dtype=torch.long, device=tokens.device)
        inputs = torch.cat([start, tokens.long() + self.offsets[: n - 1]], dim=1)
        pos = torch.arange(n, device=tokens.device).expand(b, n)  # batch-first, for per-sample gradients
        x = self.tokens(inputs) + self.positions(pos) + self.scale_embedding(self.scales[:n].expand(b, n))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) + self.logit_mask[:n]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The per-example loss (:meth:`loss`): what opacus' per-sample-gradient wrapper calls."""
        return self.loss(tokens)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-example negative log-likelihood [B] (mean over positions, nats) of full sequences."""
        logits = self.logits(tokens[:, :-1])
        target = tokens.long() + self.offsets
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        return nll.mean(dim=1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, temperature: float = 1.0,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Token sequences [n, length] (codebook indices), drawn position by position."""
        if temperature <= 0 or not math.isfinite(temperature):
            raise PrivdiffError(f"temperature {temperature} must be a positive number")
        device = self.head.weight.device
        tokens = torch.zeros(n, 0, dtype=torch.long, device=device)
        length = self.config.length
        for i in range(length):
            probabilities = (self.logits(tokens)[:, -1] / temperature).softmax(-1).float().cpu()
            if not torch.isfinite(probabilities).all():
                raise PrivdiffError("the prior's weights give non-finite probabilities: the file is damaged")
            draw = torch.multinomial(probabilities, 1, generator=generator).to(device)
            tokens = torch.cat([tokens, draw - self.offsets[i]], dim=1)
            if progress is not None:
                progress(i + 1, length)
        return tokens


def save_prior(prior: SpectralPrior, tokenizer: SpectralTokenizer, path: str | Path, *,
               report: PrivacyReport | None = None, force: bool = False) -> Path:
    """One file with the prior's weights and config, its tokenizer, and the privacy report when DP."""
    metadata = {"privdiff_kind": KIND, "config": json.dumps(asdict(prior.config)), "tokenizer": tokenizer.identity,
                "size": str(tokenizer.size), "base": str(tokenizer.base),
                **(report.to_metadata() if report is not None else {})}
    tensors = {f"prior.{k}": v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}
    tensors |= {f"tokenizer.codebook_{k}": c.contiguous() for k, c in enumerate(tokenizer.codebooks)}
    return write_tensors(path, tensors, metadata, force=force)


@dataclass(frozen=True)
class LoadedPrior:
    """A prior file: the model, the tokenizer it was trained with, and its report (None: not DP)."""

    prior: SpectralPrior
    tokenizer: SpectralTokenizer
    report: PrivacyReport | None


def check_memory(config: PriorConfig, what: str, batch: int = 0, training: bool = False,
                 per_sample: bool = False, batch_name: str = "images at once") -> None:
    """Refuse ``what`` (e.g. "pre-training") with a prior of ``config`` when :meth:`PriorConfig.memory` is over half
    of this machine's memory, in one line saying what would fit."""
    need, half = config.memory(batch, training, per_sample), half_memory()
    if half is None or need <= half:
        return

    def fits(shape: PriorConfig, n: int) -> bool:
        return shape.memory(n, training, per_sample) <= half

    one_layer = dataclasses.replace(config, layers=1)
    if batch > 1 and fits(config, 1):
        hint = f"at most {max(n for n in range(1, batch) if fits(config, n))} {batch_name} fit"
    elif config.layers > 1 and fits(one_layer, batch):
        layers = max(k for k in range(1, config.layers) if fits(dataclasses.replace(config, layers=k), batch))
        hint = f"at width {config.dim} at most {layers} layers fit"
    else:
        hint = "lower the width (dim) or use a smaller tokenizer"
    raise PrivdiffError(f"{what} with a prior of width {config.dim} x {config.layers} layers "
                        f"({config.weight_count() / 1e6:,.1f} M weights) needs about {need / 2**20:,.0f} MiB, over "
                        f"half of this machine's {2 * half / 2**20:,.0f} MiB of memory; {hint}")


def load_prior(path: str | Path, tokenizer: SpectralTokenizer | None = None) -> LoadedPrior:
    """A prior file, every record checked against the others before a weight is read or the model is built; with
    ``tokenizer``, refuses a prior trained with another tokenizer. One line naming the file otherwise."""
    with open_tensor_file(path, "prior") as file:
        what, metadata = file.what, file.metadata
        if metadata.get("privdiff_kind") != KIND:
            raise PrivdiffError(f"{what} is not a privdiff spectral prior file")
        config = _config(metadata, what)
        size, base = geometry(metadata, what)
        if len(config.vocab_sizes) != len(codebook_dims(size, base)) or config.tokens_per_scale != base * base:
            raise PrivdiffError(f"{what} is damaged: its config ({len(config.vocab_sizes)} scales of "
                                f"{config.tokens_per_scale} tokens) does not fit its size {size} and base {base}")
        expected = config.state_shapes()
        found = {k.removeprefix("prior."): v.shape for k, v in file.specs.items() if k.startswith("prior.")}
        if set(found) != set(expected):
            missing, unknown = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            raise PrivdiffError(f"{what} does not hold the weights its config needs (missing: {missing[:3]}, "
                                f"unknown: {unknown[:3]})")
        for name, shape in expected.items():
            if found[name] != shape:
                raise PrivdiffError(f"{what}'s weight {name} has shape {list(found[name])}, its config needs "
                                    f"{list(shape)}")
        check_codebooks({k.removeprefix("tokenizer."): v for k, v in file.specs.items() if not k.startswith("prior.")},
                        size, base, what, config.vocab_sizes)
        check_memory(config, f"loading {what}")
        report = _report(metadata, what)
        tensors = file.tensors()
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise PrivdiffError(f"{what} holds non-finite weights")
    codebooks = tuple(tensors[f"tokenizer.codebook_{k}"].to(torch.float32) for k in range(len(config.vocab_sizes)))
    own = checked_tokenizer(SpectralTokenizer(size, base, codebooks), metadata.get("tokenizer"), what)
    if tokenizer is not None and tokenizer.identity != own.identity:
        raise PrivdiffError(f"{what} was trained with tokenizer {own.identity}, not this one "
                            f"({tokenizer.identity}); use the tokenizer it was made with")
    prior = SpectralPrior(config)
    prior.load_state_dict({k.removeprefix("prior."): v.to(torch.float32) for k, v in tensors.items()
                           if k.startswith("prior.")})
    prior.eval()
    return LoadedPrior(prior, own, report)


def _config(metadata: dict[str, str], what: str) -> PriorConfig:
    if "config" not in metadata:
        raise PrivdiffError(f"{what} has no config record")
    raw = parse_json(metadata["config"], f"{what}'s config", limit=1 << 16, depth=2)
    fields = [f.name for f in dataclasses.fields(PriorConfig)]
    if not isinstance(raw, dict) or sorted(raw) != sorted(fields):
        raise PrivdiffError(f"{what}'s config must be an object of exactly {', '.join(fields)}")
    vocab = raw["vocab_sizes"]
    try:
        return PriorConfig(**{**raw, "vocab_sizes": tuple(vocab) if isinstance(vocab, list) else vocab})
    except PrivdiffError as exc:
        raise PrivdiffError(f"{what}'s config: {exc}") from None


def _report(metadata: dict[str, str], what: str) -> PrivacyReport | None:
    """The privacy report a prior carries (None: a public prior); a damaged one is refused in one line."""
    if REPORT_KEY not in metadata:
        return None
    parse_json(metadata[REPORT_KEY], f"{what}'s privacy report", limit=1 << 16, depth=4)
    try:
        return PrivacyReport.from_metadata(metadata)
    except (PrivdiffError, ValueError, TypeError, OverflowError) as exc:
        raise PrivdiffError(f"{what}'s privacy report is damaged: {' '.join(str(exc).split())[:160]}") from None
