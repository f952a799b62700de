"""DP style targets and guided sampling: a DP aggregate of the private images' CLIP embeddings, and
universal-guidance sampling toward it with the loaded checkpoint (post-processing: no budget spent)."""

from __future__ import annotations

from ..logic import guidance as logic
from ..logic.common import FORGE_MESSAGE, Host
from .widgets import Job, interrupt_button, progress_js, status_html

TITLE = "DP style guidance"

ENCODER_HELP = ("Image encoder: a transformers CLIP vision folder, ARCH:FILE for an open_clip checkpoint, or "
                "'small'/'tiny' (privdiff's test encoders). Target and sampling must use the same one.")


def build(host: Host, job: Job) -> None:
    import gradio as gr

    if host.forge:
        gr.Markdown(FORGE_MESSAGE)
    gr.Markdown(ENCODER_HELP)
    encoder = gr.Textbox(elem_id="privdiff_guidance_encoder",
                         label="Image encoder", placeholder="/path/to/clip-vit-large-patch14")
    with gr.Row():
        with gr.Column():
            gr.Markdown("**1. DP style target** (spends privacy budget once)")
            images = gr.Textbox(elem_id="privdiff_guidance_images", label="Private image folder (style target)")
            name = gr.Textbox(elem_id="privdiff_guidance_name", label="Target name", value="my_dp_target")
            with gr.Row():
                epsilon = gr.Number(elem_id="privdiff_guidance_epsilon", label="Target epsilon", value=1.0)
                delta = gr.Number(elem_id="privdiff_guidance_delta", label="Target delta (below 1/N)", value=1e-5)
            ledger = gr.Textbox(elem_id="privdiff_guidance_ledger", label="Target ledger (empty: the one in Settings)")
            overwrite = gr.Checkbox(elem_id="privdiff_guidance_overwrite",
                                    label="Overwrite an existing target", value=False)
            make = gr.Button("Make DP style target", variant="primary")
            target_status = gr.HTML(elem_id="privdiff_target_status")
            target_report = gr.Textbox(elem_id="privdiff_guidance_target_report",
                                       label="Target privacy report", lines=10, interactive=False)
        with gr.Column():
            gr.Markdown("**2. Guided sampling** (post-processing of the target: no budget)")
            target = gr.Textbox(elem_id="privdiff_guidance_target",
                                label="Target (name in models/privdiff_targets, or a path)", value="my_dp_target")
            prompt = gr.Textbox(elem_id="privdiff_guidance_prompt", label="Guided prompt", lines=2)
            negative = gr.Textbox(elem_id="privdiff_guidance_negative", label="Guided negative prompt")
            with gr.Row():
                num_images = gr.Number(elem_id="privdiff_guidance_num_images",
                                       label="Guided images", value=1, precision=0)
                width = gr.Number(elem_id="privdiff_guidance_width", label="Guided width", value=512, precision=0)
                height = gr.Number(elem_id="privdiff_guidance_height", label="Guided height", value=512, precision=0)
                seed = gr.Number(elem_id="privdiff_guidance_seed", label="Guided seed", value=0, precision=0)
            with gr.Row():
                steps = gr.Number(elem_id="privdiff_guidance_steps", label="Guided steps", value=30, precision=0)
                cfg = gr.Number(elem_id="privdiff_guidance_cfg", label="Guided CFG scale", value=7.0)
                weight = gr.Number(elem_id="privdiff_guidance_weight", label="Guidance weight", value=5.0)
                recurrence = gr.Number(elem_id="privdiff_guidance_recurrence", label="Recurrence", value=1, precision=0)
            with gr.Row():
                sample = gr.Button("Sample", variant="primary")
                interrupt_button(host)
            sample_status = gr.HTML(elem_id="privdiff_sample_status")
            gallery = gr.Gallery(elem_id="privdiff_guidance_gallery", label="Guided samples", columns=4)

    target_fields = {"images": images, "name": name, "image_encoder": encoder, "epsilon": epsilon, "delta": delta,
                     "ledger": ledger, "overwrite": overwrite}
    sample_fields = {"target": target, "image_encoder": encoder, "prompt": prompt, "negative_prompt": negative,
                     "num_images": num_images, "width": width, "height": height, "steps": steps, "cfg": cfg,
                     "guidance_weight": weight, "recurrence": recurrence, "seed": seed}

    def run_target(_task_id, *values):
        text, line = logic.make_target(host, logic.TargetForm(**dict(zip(target_fields, values, strict=True))))
        return text, status_html(line)

    def run_sample(_task_id, *values):
        files, line = logic.guided_sample(host, logic.GuidedForm(**dict(zip(sample_fields, values, strict=True))))
        return [str(f) for f in files], status_html(line)

    task = gr.Textbox(visible=False)
    make.click(fn=job(run_target, 2), inputs=[task, *target_fields.values()], outputs=[target_report, target_status],
               **progress_js("privdiff_target_status"))
    sample.click(fn=job(run_sample, 2), inputs=[task, *sample_fields.values()], outputs=[gallery, sample_status],
                 **progress_js("privdiff_sample_status"))
