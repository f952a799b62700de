"""The Privacy Report view (ComfyUI node, A1111 sub-tab): the report a privdiff artifact carries, as text and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from privdiff.app.guidance import target_text
from privdiff.app.release_options import report_text
from privdiff.app.spectral import prior_text
from privdiff.embeddings.files import load_embedding
from privdiff.guidance.target import ENCODER_KEY, load_target
from privdiff.privacy.report import PrivacyReport
from privdiff.wavelet.prior import KIND, load_prior


def read_report(path: Path) -> str:
    """The report an embedding, DP style target or spectral prior file carries, as text and JSON; each kind is read
    by its own checked loader."""
    kind = artifact_kind(path)
    if kind == "target":
        target = load_target(path)
        report, text = target.report, target_text(target.report, target.encoder)
    elif kind == "prior":
        report = load_prior(path).report
        text = "" if report is None else prior_text(report)
    else:
        report = PrivacyReport.from_metadata(load_embedding(path).metadata)
        text = "" if report is None else report_text(report)
    if report is None:
        return f"{path.name} carries no privdiff privacy report: nothing is known about its privacy."
    return text + "\n\n" + json.dumps(json.loads(report.to_json()), indent=2)


def artifact_kind(path: Path) -> str:
    """"target", "prior" or "embedding" from a regular .safetensors file's header; anything else is "embedding",
    whose loader refuses what it cannot read in one line."""
    if path.suffix != ".safetensors" or not path.is_file():
        return "embedding"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return "embedding"
    return "prior" if metadata.get("privdiff_kind") == KIND else "target" if ENCODER_KEY in metadata else "embedding"
