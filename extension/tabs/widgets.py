"""gradio pieces every sub-tab uses: the job wrapper's type, the progress hook, the status line, Interrupt."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from ..logic.common import Host

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
