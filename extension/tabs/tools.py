"""Embedding tools: inspect an embedding file and convert it between formats."""

from __future__ import annotations

from privdiff.release.output_plan import FORMATS

from ..logic import tools as logic
from ..logic.common import Host
from ..logic.paths import embedding_files
from .widgets import Job

TITLE = "Embedding tools"


def build(host: Host, job: Job) -> None:
    import gradio as gr

    def files() -> list[str]:
        return embedding_files(host.embeddings_dir())

    with gr.Row():
        with gr.Column():
            with gr.Row():
                choice = gr.Dropdown(files(), elem_id="privdiff_tools_choice", label="Embedding file",
                                     allow_custom_value=True)
                host.refresh_button(choice, files, "privdiff_tools_refresh")
            inspect = gr.Button("Inspect")
            fmt = gr.Radio(list(FORMATS), value="safetensors", elem_id="privdiff_tools_fmt", label="Convert to",
                           info="a1111-pt: A1111's .pt; diffusers: a .safetensors file for load_textual_inversion")
            output = gr.Textbox(elem_id="privdiff_tools_output",
                                label="Output (relative: in the embeddings folder; empty: next to the input)")
            overwrite = gr.Checkbox(elem_id="privdiff_tools_overwrite", label="Overwrite", value=False)
            convert = gr.Button("Convert")
        with gr.Column():
            result = gr.Textbox(elem_id="privdiff_tools_result", label="Result", lines=20, interactive=False)

    def run_convert(source: str, fmt: str, output: str, overwrite: bool):
        return logic.convert(host, source, fmt, output, overwrite), gr.update(choices=files())

    inspect.click(fn=lambda c: logic.inspect(host, c), inputs=[choice], outputs=[result])
    convert.click(fn=run_convert, inputs=[choice, fmt, output, overwrite], outputs=[result, choice])
