"""Embedding tools: inspect an embedding file and convert it between formats."""

from __future__ import annotations

from privdiff.output_plan import FORMATS

from .. import logic

TITLE = "Embedding tools"


def build(host: logic.Host, job) -> None:
    import gradio as gr

    with gr.Row():
        with gr.Column():
            choice = gr.Dropdown(logic.embedding_files(host.embeddings_dir()), label="Embedding file",
                                 allow_custom_value=True)
            inspect = gr.Button("Inspect")
            fmt = gr.Radio(list(FORMATS), value="safetensors", label="Convert to",
                           info="a1111-pt: A1111's .pt; diffusers: a .safetensors file for load_textual_inversion")
            output = gr.Textbox(label="Output (relative: in the embeddings folder; empty: next to the input)")
            overwrite = gr.Checkbox(label="Overwrite", value=False)
            convert = gr.Button("Convert")
        with gr.Column():
            result = gr.Textbox(label="Result", lines=20, interactive=False)
    inspect.click(fn=lambda c: logic.inspect(host, c), inputs=[choice], outputs=[result])
    convert.click(fn=lambda c, f, o, w: logic.convert(host, c, f, o, w), inputs=[choice, fmt, output, overwrite],
                  outputs=[result])
