"""Low-rank adapters around the frozen Linear layers of a diffusers UNet's transformer blocks.

``LoRALinear`` computes base(x) + (alpha / rank) · up(down(x)) with the base frozen; ``down`` starts uniform in
±1/sqrt(in) (peft's and kohya's Kaiming start for lora_A) and ``up`` at zero, so an adapted UNet starts as the
base one. The adapters are plain ``nn.Linear`` pairs, so opacus computes their per-sample gradients with its
Linear sampler, and they train in float32 whatever the UNet's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from privdiff.errors import PrivdiffError

ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
TARGETS = {"attn": ATTENTION, "attn-ff": (*ATTENTION, "ff.net.0.proj", "ff.net.2")}


class LoRALinear(nn.Module):
    """A frozen ``base`` Linear plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = base.weight.device
        self.down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():
            bound = 1 / math.sqrt(base.in_features)
            start = torch.empty(self.down.weight.shape).uniform_(-bound, bound, generator=generator)
            self.down.weight.copy_(start)
            self.up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.up(self.down(x.to(self.down.weight.dtype)))
        return self.base(x) + (update * self.scale).to(x.dtype)


def check_settings(rank: int, alpha: float, targets: str) -> None:
    """Refuse adapter settings no UNet takes, in one line naming the value."""
    if targets not in TARGETS:
        raise PrivdiffError(f"targets={targets!r} is not one of {', '.join(TARGETS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PrivdiffError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < math.inf:
        raise PrivdiffError(f"alpha must be a positive number, got {alpha!r}")


def attach(unet: nn.Module, rank: int, alpha: float, targets: str, generator: torch.Generator
           ) -> dict[str, LoRALinear]:
    """Freeze ``unet`` and put a ``LoRALinear`` around each Linear named by ``targets`` ("attn" or "attn-ff") in
    its transformer blocks; returns them by module path (diffusers names, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``), in the UNet's module order."""
    check_settings(rank, alpha, targets)
    unet.requires_grad_(False)
    suffixes = tuple("." + target for target in TARGETS[targets])
    names = [name for name, module in unet.named_modules()
             if ".transformer_blocks." in name and name.endswith(suffixes) and isinstance(module, nn.Linear)]
    if not names:
        raise PrivdiffError("this UNet has no transformer-block attention layers to adapt")
    adapters = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        adapters[name] = LoRALinear(getattr(parent, child), rank, alpha, generator)
        setattr(parent, child, adapters[name])
    return adapters


def detach(unet: nn.Module, adapters: dict[str, LoRALinear]) -> None:
    """Put the base Linear layers back in place of the adapters (the UNet as it was)."""
    for name, adapter in adapters.items():
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, adapter.base)
