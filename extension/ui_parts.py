"""Small pieces shared by the sub-tabs."""

from __future__ import annotations

import html

from .logic import Host


def status_html(line: str) -> str:
    """A status line as HTML (A1111 appends the job's time to a job's last, HTML, output)."""
    css = "error" if line.startswith("privdiff:") else "privdiff-ok"
    return f"<p class='{css}'>{html.escape(line)}</p>" if line else ""


def interrupt_button(host: Host) -> None:
    """A button that interrupts the running privdiff job at its next step (nothing is written or charged)."""
    import gradio as gr

    def interrupt() -> None:
        from modules import shared

        shared.state.interrupt()

    gr.Button("Interrupt").click(fn=interrupt, inputs=[], outputs=[])
