"""Embedding files that load in ComfyUI, A1111/Forge and diffusers.

Formats written by :func:`save_embedding`:

- ``"safetensors"`` (default, loads everywhere): SD1/SD2 ``{"emb_params": [n, dim]}``; SDXL
  ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``. The privacy report is in the header metadata.
- ``"a1111-pt"``: A1111's pickled dict (SD1/SD2 only); of the metadata only the privacy report is
  kept, in the dict under ``privdiff_privacy_report`` (A1111, Forge, ComfyUI and diffusers ignore
  unknown keys) and in a ``<file>.privacy.json`` sidecar.
- ``"diffusers"``: diffusers' own ``{token: [n, dim]}`` as ``.safetensors`` (SD1/SD2 only). For SDXL,
  diffusers loads the standard ``clip_l``/``clip_g`` file with two ``load_textual_inversion`` calls.

ComfyUI (``embedding:name``) and A1111 use the file name as the prompt word; diffusers uses the
token stored in the file (``name`` of a .pt, the key of its own format; pass ``token=`` for
``emb_params`` files), which therefore defaults to the output file's stem.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import Writer, replace_files
from privdiff.io.embedding_formats import (
    A1111_REPORT_KEY,
    REPORT_KEY,
    a1111_pt_bytes,
    check_vectors,
    read_file,
    write_safetensors,
)
from privdiff.release.output_plan import FORMATS as FORMATS  # re-exported: the formats save_embedding writes
from privdiff.release.output_plan import TOKEN_FORMATS, OutputPlan, plan_output

if TYPE_CHECKING:
    from privdiff.privacy.report import PrivacyReport

@dataclass
class Embedding:
    """Token vectors per text encoder: ``clip_l`` [n, 768] (SD1), ``clip_h`` [n, 1024] (SD2), or
    ``clip_l`` [n, 768] + ``clip_g`` [n, 1280] (SDXL); ``metadata`` holds e.g. the privacy report."""

    vectors: dict[str, torch.Tensor]
    token: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """One of "SD1", "SD2", "SDXL"."""
        if "clip_g" in self.vectors:
            return "SDXL"
        return "SD2" if next(iter(self.vectors.values())).shape[-1] == 1024 else "SD1"

    @property
    def n_vectors(self) -> int:
        """Vectors per token."""
        t = next(iter(self.vectors.values()))
        return 1 if t.dim() == 1 else int(t.shape[0])


def _load(path: Path) -> tuple[Embedding, str, dict[str, list[int]]]:
    parsed = read_file(path)
    vectors = check_vectors(parsed.tensors, str(path))
    shapes = {k: list(v.shape) for k, v in parsed.tensors.items()}
    return Embedding(vectors, parsed.token, parsed.metadata), parsed.format, shapes


def load_embedding(path: str | os.PathLike) -> Embedding:
    """Read any embedding file ComfyUI, A1111/Forge or diffusers read; vectors come back float32 [n, dim].

    Bad files (missing, empty, corrupt, truncated, unknown keys, NaN/inf, wrong width) raise
    :class:`PrivdiffError` naming the file.
    """
    return _load(Path(path))[0]


def save_embedding(
    emb: Embedding,
    path: str | os.PathLike,
    fmt: str = "safetensors",
    token: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``emb`` atomically as ``fmt`` (see module doc); an existing file needs ``force``.

    ``token`` (default: the file stem) is stored where the format has a place for it and ignored by
    the others; :func:`privdiff.release.output_plan.plan_output` refuses it there instead.
    """
    return save_planned(emb, plan_output(path, fmt, token if fmt in TOKEN_FORMATS else None, force))


def encode_files(emb: Embedding, plan: OutputPlan) -> dict[Path, Writer | None]:
    """The files ``plan`` writes for ``emb``: {path: writer of its content}, None for a stale report
    sidecar to remove. Bad vectors or metadata, or SDXL in a one-tensor format, raise PrivdiffError."""
    target, fmt = plan.path, plan.fmt
    vectors = check_vectors(emb.vectors, f"embedding for {target}")
    bad = [k for k, v in emb.metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise PrivdiffError(f"embedding for {target}: metadata {bad[0]!r} must map a string to a string")
    sdxl = "clip_g" in vectors
    if sdxl and fmt != "safetensors":
        raise PrivdiffError(
            f"{target}: SDXL embeddings (clip_l + clip_g) cannot be saved as {fmt}, which holds one tensor; "
            "save them as safetensors (diffusers loads that file with two load_textual_inversion calls)"
        )
    metadata, first = dict(emb.metadata), next(iter(vectors.values()))
    if fmt == "safetensors":
        tensors = vectors if sdxl else {"emb_params": first}
        return {target: lambda tmp: write_safetensors(tensors, metadata, tmp)}
    token = plan.token or target.stem
    if fmt == "diffusers":
        return {target: lambda tmp: write_safetensors({token: first}, metadata, tmp)}
    report = _report(metadata, f"embedding for {target}")
    data: dict[str, object] = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": first},
        "name": token,
        "step": None,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    if report is not None:
        data[A1111_REPORT_KEY] = metadata[REPORT_KEY]
    blob = a1111_pt_bytes(data)
    out: dict[Path, Writer | None] = {target: lambda tmp: tmp.write_bytes(blob)}
    sidecar = plan.sidecar
    if report is not None:
        text = report.to_json() + "\n"
        out[sidecar] = lambda tmp: tmp.write_text(text, encoding="utf-8")
    elif os.path.lexists(sidecar):
        out[sidecar] = None  # a report of the file being replaced must not describe this one
    return out


def save_planned(embedding: Embedding, plan: OutputPlan) -> Path:
    """Write ``embedding`` (and an A1111 file's report sidecar) as ``plan`` says; returns the path.

    The plan is checked again (the folder may have changed during training), every file is written to a
    temporary first and then renamed into place; on any failure the temporaries are removed and every
    existing file is left as it was. OS errors become a PrivdiffError naming the path and the reason.
    """
    plan = plan_output(plan.path, plan.fmt, plan.token, plan.force)
    replace_files(encode_files(embedding, plan))
    return plan.path


def _report(metadata: dict[str, str], where: Path | str) -> PrivacyReport | None:
    from privdiff.privacy.report import PrivacyReport

    try:
        return PrivacyReport.from_metadata(metadata)
    except PrivdiffError as exc:
        raise PrivdiffError(f"{where}: {exc}") from exc


def inspect_embedding(path: str | os.PathLike) -> dict:
    """JSON-able summary: path, format, tensors {name: shape}, vectors_per_token, family, token
    (the stored token, else the file stem that ComfyUI/A1111 use), privacy_report (dict or None)."""
    p = Path(path)
    emb, fmt, shapes = _load(p)
    report = _report(emb.metadata, p)
    return {
        "path": str(p),
        "format": fmt,
        "tensors": shapes,
        "vectors_per_token": emb.n_vectors,
        "family": emb.family,
        "token": emb.token or p.stem,
        "privacy_report": None if report is None else json.loads(report.to_json()),
    }


def convert_embedding(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    fmt: str | None = "safetensors",
    token: str | None = None,
    force: bool = False,
) -> Path:
    """Re-write ``src`` as ``fmt`` at ``dst`` (metadata, including the privacy report, is kept).

    ``fmt`` None takes the format from ``dst``'s extension. The output is planned (and refused, e.g. for a
    ``token`` the format cannot store) before ``src`` is read.
    """
    plan = plan_output(dst, fmt, token, force)
    return save_planned(load_embedding(src), plan)
