"""The bytes of embedding files, read and written the way ComfyUI, A1111/Forge and diffusers do.

Accepted layouts (what the three loaders agree on):

- a single tensor under any key: ``emb_params`` (A1111 safetensors, ComfyUI) or ``{token: tensor}``
  (diffusers' ``learned_embeds``), in ``.safetensors`` or a pickled ``.pt``/``.bin``;
- A1111's pickled dict with ``string_to_param`` {"*": tensor} (exactly one entry, as A1111 asserts);
- SDXL: ``clip_l`` [n, 768] and ``clip_g`` [n, 1280] and nothing else;
- a bare pickled tensor (diffusers loads it when given ``token=``).

``.safetensors`` files are read with safetensors and anything else with
``torch.load(weights_only=True)``, chosen by extension as ComfyUI, A1111 and Forge do.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from privdiff.errors import PrivdiffError

REPORT_KEY = "privdiff.privacy_report"  # privdiff.privacy.report.REPORT_KEY (safetensors header key)
A1111_REPORT_KEY = "privdiff_privacy_report"  # the same JSON inside an A1111 .pt dict
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".bin")
SINGLE_WIDTHS = {768: "clip_l", 1024: "clip_h"}  # SD1.x (CLIP ViT-L), SD2.x (OpenCLIP ViT-H)
SDXL_WIDTHS = {"clip_l": 768, "clip_g": 1280}
# Members of a torch zip that every A1111 release's pickle check (modules/safe.py) allows.
_A1111_MEMBER = re.compile(r"data\.pkl|version|data/\d+")
_ZIP_ALIGNMENT = 64  # torch's storage alignment, so that mmap loading (diffusers) keeps working


@dataclass
class Parsed:
    """What a file holds: tensors by their name in the file, before width checks."""

    format: str
    tensors: dict[str, torch.Tensor]
    token: str | None
    metadata: dict[str, str]


def _reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def check_input_path(path: Path) -> None:
    """Refuse missing, non-regular, empty or wrongly named files."""
    if not path.exists():
        raise PrivdiffError(f"{path}: no such file")
    if not path.is_file():
        raise PrivdiffError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise PrivdiffError(f"{path}: the file is empty")
    if path.suffix.lower() not in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES):
        raise PrivdiffError(
            f"{path}: unsupported extension {path.suffix!r}; embeddings are .safetensors, .pt or .bin"
        )


def read_file(path: Path) -> Parsed:
    """Read and classify an embedding file (tensors are not yet checked)."""
    check_input_path(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
        except Exception as exc:  # SafetensorError, OSError, ...: corrupt or truncated
            raise PrivdiffError(f"{path}: not a valid safetensors file ({_reason(exc)})") from exc
        return _classify(tensors, path, "safetensors", metadata)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...: corrupt or unsafe
        raise PrivdiffError(f"{path}: not a loadable PyTorch file ({_reason(exc)})") from exc
    if isinstance(content, torch.Tensor):
        return Parsed("pt/tensor", {"tensor": content}, None, {})
    if not isinstance(content, Mapping):
        raise PrivdiffError(f"{path}: holds a {type(content).__name__}, not an embedding dict or tensor")
    return _classify(content, path, "pt", {})


def _classify(content: Mapping, path: Path, container: str, metadata: dict[str, str]) -> Parsed:
    keys = list(content)
    if "string_to_param" in content:  # A1111 / Forge textual inversion dict
        params = content["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise PrivdiffError(f"{path}: 'string_to_param' must hold exactly one tensor")
        (key, tensor), = params.items()
        name, report = content.get("name"), content.get(A1111_REPORT_KEY)
        token = name if isinstance(name, str) and name else None
        md = {REPORT_KEY: report} if isinstance(report, str) else {}
        return Parsed("a1111-pt", {f"string_to_param.{key}": tensor}, token, md)
    if set(keys) == set(SDXL_WIDTHS):
        return Parsed(f"{container}/sdxl", dict(content), None, metadata)
    if len(keys) == 1:
        key = keys[0]
        if key == "emb_params":
            return Parsed(f"{container}/emb_params", dict(content), None, metadata)
        fmt = "diffusers" if container == "safetensors" else "diffusers-bin"
        return Parsed(fmt, dict(content), str(key), metadata)
    shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
    raise PrivdiffError(
        f"{path}: unsupported keys [{shown}]; expected one tensor, A1111 'string_to_param' "
        "or SDXL 'clip_l' + 'clip_g'"
    )


def _as_matrix(value: object, name: str, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise PrivdiffError(f"{where}: '{name}' is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise PrivdiffError(f"{where}: tensor '{name}' has dtype {value.dtype}; expected floating point")
    t = value.detach()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise PrivdiffError(
            f"{where}: tensor '{name}' has shape {list(value.shape)}; expected [n_vectors, width]"
        )
    if t.numel() == 0:
        raise PrivdiffError(f"{where}: tensor '{name}' is empty (shape {list(value.shape)})")
    t = t.to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(t).all()):
        raise PrivdiffError(f"{where}: tensor '{name}' contains NaN or infinite values")
    return t


def check_vectors(tensors: Mapping[str, object], where: str) -> dict[str, torch.Tensor]:
    """Checked float32 CPU [n, width] copies, keyed ``clip_l`` (SD1), ``clip_h`` (SD2) or
    ``clip_l`` + ``clip_g`` (SDXL)."""
    if not tensors:
        raise PrivdiffError(f"{where}: the embedding has no tensors")
    mats = {k: _as_matrix(v, k, where) for k, v in tensors.items()}
    if set(mats) == set(SDXL_WIDTHS):
        for key, width in SDXL_WIDTHS.items():
            if mats[key].shape[1] != width:
                raise PrivdiffError(
                    f"{where}: SDXL tensor '{key}' has width {mats[key].shape[1]}; expected {width}"
                )
        if mats["clip_l"].shape[0] != mats["clip_g"].shape[0]:
            raise PrivdiffError(
                f"{where}: SDXL 'clip_l' has {mats['clip_l'].shape[0]} vectors but 'clip_g' has "
                f"{mats['clip_g'].shape[0]}"
            )
        return {k: mats[k] for k in SDXL_WIDTHS}
    if len(mats) != 1:
        raise PrivdiffError(
            f"{where}: tensors {sorted(mats)}; expected one tensor or SDXL 'clip_l' + 'clip_g'"
        )
    (name, mat), = mats.items()
    key = SINGLE_WIDTHS.get(mat.shape[1])
    if key is None:
        raise PrivdiffError(
            f"{where}: tensor '{name}' has width {mat.shape[1]}; expected 768 (SD1) or 1024 (SD2), "
            "or an SDXL pair 'clip_l' [n,768] + 'clip_g' [n,1280]"
        )
    return {key: mat}


def write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], tmp: Path) -> None:
    """Write ``tensors`` (contiguous float32) with ``metadata`` in the safetensors header."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or None)


def a1111_pt_bytes(obj: object) -> bytes:
    """``torch.save(obj)`` as a zip holding only data.pkl, data/N and version.

    A1111's pickle check rejects any other member, and torch >= 2.1 adds ``byteorder``,
    ``.format_version``, ``.storage_alignment`` and ``.data/serialization_id`` (A1111 issue #15214).
    Storages stay 64-byte aligned so that ``torch.load(mmap=True)`` (diffusers) still works.
    """
    raw = io.BytesIO()
    torch.save(obj, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            root, _, member = name.partition("/")
            if not _A1111_MEMBER.fullmatch(member):
                continue
            info = zipfile.ZipInfo(f"{root}/{member}", date_time=(1980, 1, 1, 0, 0, 0))
            header = 30 + len(info.filename.encode()) + 4  # local header, name, extra-field header
            pad = -(out.tell() + header) % _ZIP_ALIGNMENT
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding field, as torch
            dst.writestr(info, src.read(name))
    return out.getvalue()
