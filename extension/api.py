"""HTTP routes next to A1111's ``/sdapi`` (with ``--api``), for scripts and tests: the tab's actions by JSON.

- ``POST /privdiff/v1/textual-inversion``: the DP Textual Inversion fields (``logic.TrainForm``) →
  {"report", "status", "ok"}; queued like a txt2img job, so ``/sdapi/v1/progress`` and
  ``/sdapi/v1/interrupt`` work on it.
- ``GET /privdiff/v1/report?file=NAME``: the privacy report an embedding file carries.
"""

from __future__ import annotations

from typing import Any

from . import logic


def routes(app: Any, host: logic.Host) -> None:
    """Add the routes to A1111's FastAPI ``app``."""
    from fastapi import Body, HTTPException
    from modules import shared
    from modules.call_queue import queue_lock

    def train(fields: dict = Body(...)) -> dict:  # noqa: B008 (FastAPI's declaration style)
        try:
            form = logic.TrainForm(**fields)
        except TypeError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        with queue_lock:
            shared.state.begin(job="privdiff")
            try:
                report, status = logic.train(host, form)
            finally:
                shared.state.end()
        return {"ok": bool(report), "report": report, "status": status}

    def report(file: str) -> dict:
        return {"report": logic.report(host, file)}

    app.add_api_route("/privdiff/v1/textual-inversion", train, methods=["POST"])
    app.add_api_route("/privdiff/v1/report", report, methods=["GET"])
