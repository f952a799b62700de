"""DP-LoRA adapters as a kohya-layout LoRA file, the one layout ComfyUI, A1111 and diffusers all read.

Keys: ``lora_unet_`` + the diffusers module path with dots as underscores, then ``.lora_down.weight``
[rank, in], ``.lora_up.weight`` [out, rank] and ``.alpha`` (a scalar): every loader applies
strength · (alpha / rank) · up @ down. The header carries kohya's descriptive keys (A1111 sorts its Lora cards by
``ss_base_model_version``) and the privacy report, the same entry as on every privdiff artifact
(``PrivacyReport.to_metadata``); nothing about the data
(no captions, folders or tag counts) and no diffusers ``lora_adapter_metadata`` (diffusers refuses it beside
kohya alphas).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from privdiff.io.atomic import atomic_write
from privdiff.lora.adapters import LoRALinear
from privdiff.privacy.report import PrivacyReport

_BASE_VERSION = {"SD1": "sd_v1", "SD2": "sd_v2", "SDXL": "sdxl_base_v1-0"}
_ARCHITECTURE = {"SD1": "stable-diffusion-v1/lora", "SD2": "stable-diffusion-v2-512/lora",
                 "SDXL": "stable-diffusion-xl-v1-base/lora"}


def kohya_state(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The adapters' tensors under kohya keys (float32 on the CPU)."""
    state = {}
    for name, adapter in adapters.items():
        stem = "lora_unet_" + name.replace(".", "_")
        state[f"{stem}.lora_down.weight"] = adapter.down.weight.detach().float().cpu().contiguous()
        state[f"{stem}.lora_up.weight"] = adapter.up.weight.detach().float().cpu().contiguous()
        state[f"{stem}.alpha"] = torch.tensor(float(adapter.alpha))
    return state


def header(adapters: dict[str, LoRALinear], family: str, report: PrivacyReport | None) -> dict[str, str]:
    """The file's metadata: kohya's descriptive keys and the privacy report (all strings)."""
    first = next(iter(adapters.values()))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank),
            "ss_network_alpha": f"{first.alpha:g}", "ss_base_model_version": _BASE_VERSION.get(family, "sd_v1"),
            "modelspec.architecture": _ARCHITECTURE.get(family, _ARCHITECTURE["SD1"])}
    return meta | (report.to_metadata() if report is not None else {})


def save_lora(path: str | Path, adapters: dict[str, LoRALinear], family: str, report: PrivacyReport | None,
              force: bool = False) -> Path:
    """Write the adapters to ``path`` (.safetensors), all or nothing; refuses an existing file unless ``force``."""
    state, meta = kohya_state(adapters), header(adapters, family, report)
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta), force)
