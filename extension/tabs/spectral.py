"""Spectral DP generation: a DP-SGD fine-tune of a public spectral prior (coarse Haar-wavelet tokens) on a private
folder, and samples from any prior, optionally upsampled by a public model (post-processing: no budget)."""

from __future__ import annotations

from ..logic import spectral as logic
from ..logic.common import Host
from .widgets import Job, interrupt_button, progress_js, status_html

TITLE = "Spectral DP"

GUARANTEE = ("The guarantee covers the **DP prior** only: its samples and their upsampling (bicubic, an upscaler, "
             "an SD refine pass) are post-processing and spend no budget. The public prior's pre-training images "
             "must really be public, never the private folder: make it with `privdiff wavelet tokenizer` and "
             "`privdiff wavelet pretrain` on public images and put it in `models/privdiff_priors`.")

FORGE_NOTE = ("On Forge the SD refine pass is not supported yet (its model objects differ from A1111's); "
              "fine-tuning and sampling the prior work.")


def build(host: Host, job: Job) -> None:
    import gradio as gr

    def priors() -> list[str]:
        return logic.prior_files(host.priors_dir())

    if host.forge:
        gr.Markdown(FORGE_NOTE)
    gr.Markdown(GUARANTEE)
    with gr.Row():
        with gr.Column():
            gr.Markdown("**1. DP fine-tune** (spends privacy budget once; an interrupted run resumes when started "
                        "again with the same settings)")
            images = gr.Textbox(elem_id="privdiff_spectral_images",
                                label="Private image folder (prior fine-tune)", placeholder="/path/to/private/images")
            public = gr.Dropdown(priors(), elem_id="privdiff_spectral_public",
                                 label="Public prior (a file in models/privdiff_priors, or a path)",
                                 allow_custom_value=True)
            name = gr.Textbox(elem_id="privdiff_spectral_name", label="DP prior name", value="my_dp_prior")
            with gr.Row():
                epsilon = gr.Number(elem_id="privdiff_spectral_epsilon", label="Prior epsilon", value=4.0)
                delta = gr.Number(elem_id="privdiff_spectral_delta", label="Prior delta (below 1/N)", value=1e-5)
                sample_rate = gr.Number(elem_id="privdiff_spectral_sample_rate",
                                        label="Prior sample rate q", value=0.25)
                clip_norm = gr.Number(elem_id="privdiff_spectral_clip_norm", label="Prior clip norm C", value=1.0)
            with gr.Row():
                steps = gr.Number(elem_id="privdiff_spectral_steps", label="Fine-tune steps", value=300, precision=0)
                learning_rate = gr.Number(elem_id="privdiff_spectral_learning_rate",
                                          label="Fine-tune learning rate", value=3e-4)
            ledger = gr.Textbox(elem_id="privdiff_spectral_ledger", label="Prior ledger (empty: the one in Settings)")
            overwrite = gr.Checkbox(elem_id="privdiff_spectral_overwrite",
                                    label="Overwrite an existing prior", value=False)
            with gr.Row():
                finetune = gr.Button("Fine-tune DP prior", variant="primary", elem_id="privdiff_spectral_finetune")
                interrupt_button(host)
            finetune_status = gr.HTML(elem_id="privdiff_spectral_finetune_status")
            report = gr.Textbox(elem_id="privdiff_spectral_report",
                                label="Prior privacy report", lines=10, interactive=False)
        with gr.Column():
            gr.Markdown("**2. Sample** (post-processing of the prior: no budget)")
            with gr.Row():
                prior = gr.Dropdown(priors(), elem_id="privdiff_spectral_prior",
                                    label="Prior (a file in models/privdiff_priors, or a path)",
                                    allow_custom_value=True)
                refresh = gr.Button("Refresh lists")
            with gr.Row():
                num_images = gr.Number(elem_id="privdiff_spectral_num_images",
                                       label="Images to sample", value=4, precision=0)
                seed = gr.Number(elem_id="privdiff_spectral_seed", label="Seed (-1: random)", value=0, precision=0)
                temperature = gr.Number(elem_id="privdiff_spectral_temperature", label="Temperature", value=1.0)
            upsampling = gr.Radio(list(logic.UPSAMPLING), value="none", elem_id="privdiff_spectral_upsampling",
                                  label="Upsampling",
                                  info="bicubic: by the scale; upscaler: a model file spandrel reads; SD refine: an "
                                       "img2img pass with the loaded checkpoint")
            with gr.Row():
                scale = gr.Number(elem_id="privdiff_spectral_scale", label="Bicubic scale", value=4, precision=0)
                upscaler = gr.Textbox(elem_id="privdiff_spectral_upscaler",
                                      label="Upscaler model file", placeholder="models/ESRGAN/4x-UltraSharp.pth")
            refine_prompt = gr.Textbox(elem_id="privdiff_spectral_refine_prompt", label="SD refine prompt", lines=2)
            negative = gr.Textbox(elem_id="privdiff_spectral_negative", label="SD refine negative prompt")
            with gr.Row():
                strength = gr.Number(elem_id="privdiff_spectral_strength", label="SD refine strength", value=0.5)
                refine_steps = gr.Number(elem_id="privdiff_spectral_refine_steps",
                                         label="SD refine steps", value=30, precision=0)
                cfg = gr.Number(elem_id="privdiff_spectral_cfg", label="SD refine CFG scale", value=5.0)
                refine_size = gr.Number(elem_id="privdiff_spectral_refine_size",
                                        label="SD refine size (0: the model's)", value=0, precision=0)
            with gr.Row():
                sample = gr.Button("Sample", variant="primary", elem_id="privdiff_spectral_sample")
                interrupt_button(host)
            sample_status = gr.HTML(elem_id="privdiff_spectral_sample_status")
            gallery = gr.Gallery(elem_id="privdiff_spectral_gallery", label="Spectral samples", columns=4)

    finetune_fields = {"images": images, "prior": public, "name": name, "epsilon": epsilon, "delta": delta,
                       "sample_rate": sample_rate, "clip_norm": clip_norm, "steps": steps,
                       "learning_rate": learning_rate, "ledger": ledger, "overwrite": overwrite}
    sample_fields = {"prior": prior, "num_images": num_images, "seed": seed, "temperature": temperature,
                     "upsampling": upsampling, "scale": scale, "upscaler": upscaler, "refine_prompt": refine_prompt,
                     "negative_prompt": negative, "strength": strength, "refine_steps": refine_steps, "cfg": cfg,
                     "refine_size": refine_size}

    def run_finetune(_task_id, *values):
        form = logic.SpectralForm(**dict(zip(finetune_fields, values, strict=True)))
        text, line = logic.spectral_finetune(host, form)
        name = form.name.strip()
        written = name if name.endswith(".safetensors") else f"{name}.safetensors"
        picked = gr.update(choices=priors(), value=written) if text else gr.update()  # the new prior, to sample
        return text, picked, status_html(line)

    def run_sample(_task_id, *values):
        files, line = logic.spectral_sample(host, logic.SpectralSampleForm(**dict(zip(sample_fields, values,
                                                                                       strict=True))))
        return [str(f) for f in files], status_html(line)

    def refresh_lists():
        return gr.update(choices=priors()), gr.update(choices=priors())

    task = gr.Textbox(visible=False)
    refresh.click(fn=refresh_lists, inputs=[], outputs=[public, prior])
    finetune.click(fn=job(run_finetune, 3), inputs=[task, *finetune_fields.values()],
                   outputs=[report, prior, finetune_status], **progress_js("privdiff_spectral_finetune_status"))
    sample.click(fn=job(run_sample, 2), inputs=[task, *sample_fields.values()], outputs=[gallery, sample_status],
                 **progress_js("privdiff_spectral_sample_status"))
