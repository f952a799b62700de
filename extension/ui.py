"""The privdiff tab: one sub-tab module per capability in ``extension/tabs/`` (gradio 3 and 4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .install import unmet
from .logic import Host
from .tabs import guidance, he, reports, spectral, textual_inversion, tools

SUBTABS = (textual_inversion, guidance, spectral, he, reports, tools)
"""Each module has ``TITLE`` and ``build(host, job)``; a new capability adds one module here."""

Job = Callable[[Callable[..., Any], int], Callable[..., Any]]
"""``job(fn, n_outputs)``: ``fn`` wrapped as a queued web-UI job with progress (A1111's
``wrap_gradio_gpu_call``); its first input is the task id and its last output is HTML."""


def progress_js(status_id: str) -> dict[str, str]:
    """The click handler's JavaScript: a task id for A1111's progress bar, shown above ``status_id``."""
    import gradio as gr

    code = ("(...args) => { const id = randomId(); "
            f"requestProgress(id, gradioApp().getElementById('{status_id}'), null, () => {{}}); "
            "args[0] = id; return args; }")
    return {"_js" if int(gr.__version__.split(".")[0]) < 4 else "js": code}


def build(host: Host, job: Job):
    """The tab's gr.Blocks."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("**privdiff**: differentially private adaptation of the loaded checkpoint. Every file it "
                    "writes carries its privacy report; a budget ledger tracks what each image has spent.")
        missing = unmet()
        if missing:  # install.py could not meet these without changing an installed package
            gr.Markdown("**Unavailable here** (see the console at start-up):\n" + "".join(f"\n- {line}"
                                                                                       for line in missing))
        with gr.Tabs(elem_id="privdiff_tabs"):
            for module in SUBTABS:
                with gr.Tab(module.TITLE, elem_id=f"privdiff_{module.__name__.rsplit('.', 1)[-1]}"):
                    module.build(host, job)
    return tab
