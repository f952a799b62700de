"""DP Textual Inversion: train a DP embedding on the loaded checkpoint into the embeddings folder."""

from __future__ import annotations

from ..logic import textual_inversion as logic
from ..logic.common import FORGE_MESSAGE, Host
from .widgets import Job, interrupt_button, progress_js, status_html

TITLE = "DP Textual Inversion"


def build(host: Host, job: Job) -> None:
    import gradio as gr

    if host.forge:
        gr.Markdown(FORGE_MESSAGE)
    with gr.Row():
        with gr.Column():
            images = gr.Textbox(elem_id="privdiff_ti_images",
                                label="Private image folder", placeholder="/path/to/private/images")
            name = gr.Textbox(elem_id="privdiff_ti_name", label="Embedding name (the prompt word)", value="my_dp_style")
            method = gr.Radio(["dpagg", "dpsgd"], value="dpagg", elem_id="privdiff_ti_method", label="Method",
                              info="dpagg: one embedding per image, clipped and averaged with noise (DPAgg-TI); "
                                   "dpsgd: one embedding trained with DP-SGD")
            with gr.Row():
                epsilon = gr.Number(elem_id="privdiff_ti_epsilon", label="Epsilon", value=4.0, minimum=0.01)
                delta = gr.Number(elem_id="privdiff_ti_delta", label="Delta (below 1/N)", value=1e-5)
                sample_rate = gr.Number(elem_id="privdiff_ti_sample_rate", label="Sample rate q", value=1.0)
                clip_norm = gr.Number(elem_id="privdiff_ti_clip_norm", label="Clip norm C", value=1.0)
            with gr.Row():
                vectors = gr.Slider(1, 16, value=1, step=1, elem_id="privdiff_ti_vectors", label="Vectors per token")
                init_word = gr.Textbox(elem_id="privdiff_ti_init_word", label="Initialisation word", value="style")
                resolution = gr.Number(elem_id="privdiff_ti_resolution",
                                       label="Training resolution (0: the model's)", value=0, precision=0)
            with gr.Row():
                steps = gr.Number(elem_id="privdiff_ti_steps", label="Steps", value=200, precision=0)
                learning_rate = gr.Number(elem_id="privdiff_ti_learning_rate", label="Learning rate", value=5e-3)
                batch_size = gr.Number(elem_id="privdiff_ti_batch_size", label="Batch size", value=4, precision=0)
            with gr.Row():
                ledger = gr.Textbox(elem_id="privdiff_ti_ledger", label="Ledger (empty: the one in Settings)")
                budget = gr.Number(elem_id="privdiff_ti_budget",
                                   label="Per-image budget epsilon (0: keep the ledger's)", value=0)
            with gr.Row():
                overwrite = gr.Checkbox(elem_id="privdiff_ti_overwrite",
                                        label="Overwrite an existing embedding", value=False)
                new_release = gr.Checkbox(elem_id="privdiff_ti_new_release",
                                          label="New release for a repeated request", value=False)
            with gr.Row():
                train = gr.Button("Train DP embedding", variant="primary", elem_id="privdiff_ti_train")
                interrupt_button(host)
        with gr.Column():
            status = gr.HTML(elem_id="privdiff_ti_status")
            report = gr.Textbox(elem_id="privdiff_ti_report", label="Privacy report", lines=14, interactive=False)

    fields = {"images": images, "name": name, "method": method, "epsilon": epsilon, "delta": delta,
              "sample_rate": sample_rate, "clip_norm": clip_norm, "n_vectors": vectors, "init_word": init_word,
              "steps": steps, "learning_rate": learning_rate, "batch_size": batch_size, "resolution": resolution,
              "ledger": ledger, "budget_epsilon": budget, "overwrite": overwrite, "new_release": new_release}

    def run(_task_id, *values):
        text, line = logic.train(host, logic.TrainForm(**dict(zip(fields, values, strict=True))))
        return text, status_html(line)

    train.click(fn=job(run, 2), inputs=[gr.Textbox(visible=False), *fields.values()], outputs=[report, status],
                **progress_js("privdiff_ti_status"))

