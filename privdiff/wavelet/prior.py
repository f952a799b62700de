"""The autoregressive prior: a small decoder-only transformer over spectral token sequences.

Position i predicts token i from tokens < i (a start token first). Inputs embed (scale, code) pairs from one
table with per-scale offsets, plus a learned position embedding and a scale embedding; the output head is
masked to the codebook of the position's scale. Built from Linear, Embedding and LayerNorm only, so opacus
computes exact per-sample gradients with its own hooks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from privdiff.atomic import atomic_write
from privdiff.errors import PrivdiffError
from privdiff.privacy.report import PrivacyReport
from privdiff.wavelet.tokenizer import SpectralTokenizer

KIND = "privdiff spectral prior"


@dataclass(frozen=True)
class PriorConfig:
    """Shape of the prior; ``vocab_sizes`` and ``tokens_per_scale`` come from the tokenizer."""

    vocab_sizes: tuple[int, ...]
    tokens_per_scale: int
    dim: int = 128
    layers: int = 4
    heads: int = 4

    @property
    def length(self) -> int:
        return len(self.vocab_sizes) * self.tokens_per_scale

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
        if config.dim % config.heads:
            raise PrivdiffError(f"prior width {config.dim} is not a multiple of its {config.heads} heads")
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
            logits = self.logits(tokens)[:, -1] / temperature
            draw = torch.multinomial(logits.softmax(-1).float().cpu(), 1, generator=generator).to(device)
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
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), force=force)


@dataclass(frozen=True)
class LoadedPrior:
    """A prior file: the model, the tokenizer it was trained with, and its report (None: not DP)."""

    prior: SpectralPrior
    tokenizer: SpectralTokenizer
    report: PrivacyReport | None


def load_prior(path: str | Path, tokenizer: SpectralTokenizer | None = None) -> LoadedPrior:
    """A prior file; with ``tokenizer``, refuses a prior trained with another tokenizer."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("privdiff_kind") != KIND:
                raise PrivdiffError(f"{path} is not a privdiff spectral prior file")
            state = {k: f.get_tensor(k) for k in list(f.keys())}
        raw = json.loads(metadata["config"])
        config = PriorConfig(**{**raw, "vocab_sizes": tuple(raw["vocab_sizes"])})
        prior = SpectralPrior(config)
        prior.load_state_dict({k.removeprefix("prior."): v for k, v in state.items() if k.startswith("prior.")})
        codebooks = tuple(state[f"tokenizer.codebook_{k}"] for k in range(len(config.vocab_sizes)))
        own = SpectralTokenizer(int(metadata["size"]), int(metadata["base"]), codebooks)
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise PrivdiffError(f"cannot read prior {path}: {' '.join(str(exc).split())[:300]}") from exc
    if own.identity != metadata["tokenizer"]:
        raise PrivdiffError(f"prior {path} is damaged: its tokenizer does not match its record")
    if tokenizer is not None and tokenizer.identity != own.identity:
        raise PrivdiffError(f"prior {path} was trained with tokenizer {own.identity}, not this one "
                            f"({tokenizer.identity}); use the tokenizer it was made with")
    prior.eval()
    return LoadedPrior(prior, own, PrivacyReport.from_metadata(metadata))
