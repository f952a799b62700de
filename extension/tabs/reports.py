"""Privacy report and ledger: the report an embedding file carries, and a ledger's budget and spend."""

from __future__ import annotations

from ..logic import reports as logic
from ..logic.common import Host
from ..logic.paths import embedding_files
from .widgets import Job

TITLE = "Privacy report / ledger"


def build(host: Host, job: Job) -> None:
    import gradio as gr

    def files() -> list[str]:
        return embedding_files(host.embeddings_dir())

    with gr.Row():
        with gr.Column():
            with gr.Row():
                choice = gr.Dropdown(files(), elem_id="privdiff_reports_choice", label="Embedding file to report on",
                                     allow_custom_value=True)
                host.refresh_button(choice, files, "privdiff_reports_refresh")
            show = gr.Button("Show report", variant="primary")
            report = gr.Textbox(elem_id="privdiff_reports_report",
                                label="The file's privacy report", lines=18, interactive=False)
        with gr.Column():
            ledger_path = gr.Textbox(elem_id="privdiff_reports_ledger_path",
                                     label="Ledger to show (empty: the one in Settings)")
            show_ledger = gr.Button("Show ledger")
            summary = gr.Textbox(elem_id="privdiff_reports_summary",
                                 label="Ledger: budget, releases, largest per-image spend", lines=18,
                                 interactive=False)
    show.click(fn=lambda c: logic.report(host, c), inputs=[choice], outputs=[report])
    show_ledger.click(fn=lambda p: logic.ledger(host, p), inputs=[ledger_path], outputs=[summary])
