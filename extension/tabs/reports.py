"""Privacy report and ledger: the report an embedding file carries, and a ledger's budget and spend."""

from __future__ import annotations

from .. import logic

TITLE = "Privacy report / ledger"


def build(host: logic.Host, job) -> None:
    import gradio as gr

    def files():
        return gr.update(choices=logic.embedding_files(host.embeddings_dir()))

    with gr.Row():
        with gr.Column():
            choice = gr.Dropdown(logic.embedding_files(host.embeddings_dir()), label="Embedding file",
                                 allow_custom_value=True)
            with gr.Row():
                refresh = gr.Button("Refresh list")
                show = gr.Button("Show report", variant="primary")
            report = gr.Textbox(label="Privacy report", lines=18, interactive=False)
        with gr.Column():
            ledger_path = gr.Textbox(label="Ledger (empty: the one in Settings)")
            show_ledger = gr.Button("Show ledger")
            summary = gr.Textbox(label="Ledger: budget, releases, largest per-image spend", lines=18,
                                 interactive=False)
    refresh.click(fn=files, inputs=[], outputs=[choice])
    show.click(fn=lambda c: logic.report(host, c), inputs=[choice], outputs=[report])
    show_ledger.click(fn=lambda p: logic.ledger(host, p), inputs=[ledger_path], outputs=[summary])
