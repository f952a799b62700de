"""HTTP routes next to A1111's ``/sdapi`` (with ``--api``), for scripts and tests: the tab's actions by JSON.

- ``POST /privdiff/v1/textual-inversion``: the DP Textual Inversion fields (``logic.textual_inversion.TrainForm``) →
  {"report", "status", "ok"}.
- ``POST /privdiff/v1/lora``: the DP LoRA fields (``logic.lora.LoRAForm``) → {"report", "status", "ok"}.
- ``POST /privdiff/v1/spectral-finetune``: the Spectral DP fine-tune fields (``logic.spectral.SpectralForm``) →
  {"report", "status", "ok"}.
- ``POST /privdiff/v1/spectral-sample``: the spectral sampling fields (``logic.spectral.SpectralSampleForm``) →
  {"files", "status", "ok"}.
- ``POST /privdiff/v1/he-sample``: the encrypted denoising fields (``logic.he.EncryptedForm``) →
  {"files", "report", "status", "ok"}.
- ``POST /privdiff/v1/audit``: the Audit fields (``logic.audit.AuditForm``) → {"result", "status", "ok"} (not a
  release: nothing written, no ledger charged).
- ``GET /privdiff/v1/report?file=NAME``: the privacy report an embedding file carries.

The POST routes are queued like a txt2img job, so ``/sdapi/v1/progress`` and ``/sdapi/v1/interrupt`` work on them;
an unknown, missing or wrongly typed field is a 422 with one line naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from privdiff.errors import PrivdiffError

from .logic import audit, he, lora, reports, spectral, textual_inversion
from .logic.common import Host
from .logic.forms import parse_form


def routes(app: Any, host: Host) -> None:
    """Add the routes to A1111's FastAPI ``app``."""
    from fastapi import Body, HTTPException
    from modules import shared
    from modules.call_queue import queue_lock

    def job(form_type: type, action: Callable[[Host, Any], tuple], *keys: str) -> Callable[..., dict]:
        """A route for ``action``, which returns one value per key and then the status line; "ok" is whether the
        first value is non-empty."""
        def run(fields: Any = Body(...)) -> dict:  # noqa: B008 (FastAPI's declaration style)
            try:
                form = parse_form(form_type, fields)
            except PrivdiffError as exc:
                raise HTTPException(status_code=422, detail=f"privdiff: {exc}") from None
            with queue_lock:
                shared.state.begin(job="privdiff")
                try:
                    *values, status = action(host, form)
                finally:
                    shared.state.end()
            answer = dict(zip(keys, values, strict=True))
            if "files" in answer:  # A1111's output folders may be relative
                answer["files"] = [str(Path(f).absolute()) for f in answer["files"]]
            return {"ok": bool(values[0]), **answer, "status": status}

        return run

    def report(file: str) -> dict:
        return {"report": reports.report(host, file)}

    app.add_api_route("/privdiff/v1/textual-inversion",
                      job(textual_inversion.TrainForm, textual_inversion.train, "report"), methods=["POST"])
    app.add_api_route("/privdiff/v1/lora", job(lora.LoRAForm, lora.train, "report"), methods=["POST"])
    app.add_api_route("/privdiff/v1/spectral-finetune",
                      job(spectral.SpectralForm, spectral.spectral_finetune, "report"), methods=["POST"])
    app.add_api_route("/privdiff/v1/spectral-sample",
                      job(spectral.SpectralSampleForm, spectral.spectral_sample, "files"), methods=["POST"])
    app.add_api_route("/privdiff/v1/he-sample", job(he.EncryptedForm, he.encrypted_sample, "files", "report"),
                      methods=["POST"])
    app.add_api_route("/privdiff/v1/audit", job(audit.AuditForm, audit.audit, "result"), methods=["POST"])
    app.add_api_route("/privdiff/v1/report", report, methods=["GET"])
