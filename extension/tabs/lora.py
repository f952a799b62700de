"""DP LoRA: train a DP LoRA on the loaded checkpoint into the web UI's Lora folder."""

from __future__ import annotations

from ..logic import lora as logic
from ..logic.common import FORGE_MESSAGE, Host
from .widgets import Job, interrupt_button, progress_js, status_html

TITLE = "DP LoRA"


def build(host: Host, job: Job) -> None:
    import gradio as gr

    if host.forge:
        gr.Markdown(FORGE_MESSAGE)
    with gr.Row():
        with gr.Column():
            images = gr.Textbox(elem_id="privdiff_lora_images",
                                label="Private image folder (LoRA)", placeholder="/path/to/private/images")
            name = gr.Textbox(elem_id="privdiff_lora_name", label="LoRA name (prompt with <lora:NAME:1>)",
                              value="my_dp_lora")
            with gr.Row():
                epsilon = gr.Number(elem_id="privdiff_lora_epsilon", label="LoRA epsilon", value=4.0, minimum=0.01)
                delta = gr.Number(elem_id="privdiff_lora_delta", label="LoRA delta (below 1/N)", value=1e-5)
                sample_rate = gr.Number(elem_id="privdiff_lora_sample_rate", label="LoRA sample rate q (1: batch/N)",
                                        value=1.0)
                clip_norm = gr.Number(elem_id="privdiff_lora_clip_norm", label="LoRA clip norm C", value=1.0)
            with gr.Row():
                rank = gr.Number(elem_id="privdiff_lora_rank", label="LoRA rank", value=4, precision=0)
                alpha = gr.Number(elem_id="privdiff_lora_alpha", label="LoRA alpha", value=4.0)
                targets = gr.Radio(["attn", "attn-ff"], value="attn", elem_id="privdiff_lora_targets",
                                   label="LoRA adapted layers", info="attn: attention projections; attn-ff: also the "
                                                                 "feed-forward layers")
            with gr.Row():
                steps = gr.Number(elem_id="privdiff_lora_steps", label="LoRA steps", value=200, precision=0)
                learning_rate = gr.Number(elem_id="privdiff_lora_learning_rate", label="LoRA learning rate", value=1e-3)
                batch_size = gr.Number(elem_id="privdiff_lora_batch_size", label="LoRA batch size", value=16,
                                       precision=0)
                resolution = gr.Number(elem_id="privdiff_lora_resolution",
                                       label="LoRA training resolution (0: the model's)", value=0, precision=0)
            prompt = gr.Textbox(elem_id="privdiff_lora_prompt", label="LoRA training prompt (public; empty: none)")
            with gr.Row():
                ledger = gr.Textbox(elem_id="privdiff_lora_ledger", label="LoRA ledger (empty: the one in Settings)")
                budget = gr.Number(elem_id="privdiff_lora_budget",
                                   label="LoRA per-image budget epsilon (0: keep the ledger's)", value=0)
            with gr.Row():
                overwrite = gr.Checkbox(elem_id="privdiff_lora_overwrite", label="Overwrite an existing LoRA",
                                        value=False)
                new_release = gr.Checkbox(elem_id="privdiff_lora_new_release",
                                          label="New LoRA release for a repeated request", value=False)
            with gr.Row():
                train = gr.Button("Train DP LoRA", variant="primary", elem_id="privdiff_lora_train")
                interrupt_button(host)
        with gr.Column():
            status = gr.HTML(elem_id="privdiff_lora_status")
            report = gr.Textbox(elem_id="privdiff_lora_report", label="LoRA privacy report", lines=14,
                                interactive=False)

    fields = {"images": images, "name": name, "epsilon": epsilon, "delta": delta, "sample_rate": sample_rate,
              "clip_norm": clip_norm, "rank": rank, "alpha": alpha, "targets": targets, "steps": steps,
              "learning_rate": learning_rate, "batch_size": batch_size, "prompt": prompt, "resolution": resolution,
              "ledger": ledger, "budget_epsilon": budget, "overwrite": overwrite, "new_release": new_release}

    def run(_task_id, *values):
        text, line = logic.train(host, logic.LoRAForm(**dict(zip(fields, values, strict=True))))
        return text, status_html(line)

    train.click(fn=job(run, 2), inputs=[gr.Textbox(visible=False), *fields.values()], outputs=[report, status],
                **progress_js("privdiff_lora_status"))
