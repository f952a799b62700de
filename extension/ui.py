"""The privdiff tab: one sub-tab module per capability in ``extension/tabs/`` (gradio 3 and 4)."""

from __future__ import annotations

from typing import Any

from .install import unmet
from .logic.common import Host
from .tabs import audit, guidance, he, lora, reports, spectral, textual_inversion, tools
from .tabs.widgets import Job

SUBTABS = (textual_inversion, lora, guidance, spectral, he, audit, reports, tools)
"""Each module has ``TITLE`` and ``build(host, job)``; a new capability adds one module here."""


def build(host: Host, job: Job) -> Any:
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
