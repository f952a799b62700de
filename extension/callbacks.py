"""Registers privdiff with AUTOMATIC1111 (or Forge) through its script callbacks: settings, the tab, the API routes.

The tab and the routes are imported when A1111 calls for them, not when the script loads."""

from __future__ import annotations

from .settings import on_ui_settings


def on_ui_tabs() -> list[tuple[object, str, str]]:
    """The privdiff tab; a failure to build it is reported on the console and leaves the web UI running."""
    import gradio as gr
    from modules import errors
    from modules.call_queue import wrap_gradio_gpu_call

    from .host import A1111Host
    from .ui import build

    try:
        # on an unexpected error A1111 shows these outputs and then a one-line error as the last (HTML) one
        tab = build(A1111Host(), lambda fn, n: wrap_gradio_gpu_call(fn, extra_outputs=[gr.update()] * (n - 1)))
    except Exception:  # never break the web UI's start-up over this tab
        errors.report("privdiff: the tab could not be built", exc_info=True)
        return []
    return [(tab, "privdiff", "privdiff")]


def on_app_started(_blocks: object, app: object) -> None:
    """privdiff's JSON routes (``extension/api.py``) when the web UI serves its API."""
    from modules import shared

    from .api import routes
    from .host import A1111Host

    if getattr(shared.cmd_opts, "api", False):
        routes(app, A1111Host())


def register() -> None:
    """Hand the callbacks to A1111 (called once by ``register.py``)."""
    from modules import script_callbacks

    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)
