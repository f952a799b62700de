"""Encrypted denoising (HE-Diffusion): the loaded checkpoint's UNet runs in the web UI (the key holder, with the
secret key); each scheduler step's update runs on CKKS ciphertexts for the selected latent elements, by a worker
that gets the public context only."""

from __future__ import annotations

from ..logic import he as logic
from ..logic.common import FORGE_MESSAGE, Host
from .widgets import Job, interrupt_button, progress_js, status_html

TITLE = "Encrypted denoising"

THREAT_MODEL = ("Encryption protects the latent from the **worker** only: whoever runs the UNet (this web UI, the "
                "key holder) sees the prompt and every latent in plaintext. Run the worker elsewhere with "
                "`privdiff he worker --listen HOST:PORT` and give its address below; empty runs both roles here. "
                "The report says what was encrypted and what the worker saw.")


def build(host: Host, job: Job) -> None:
    import gradio as gr

    from privdiff.he.sampler import SAMPLERS
    from privdiff.he.selection import CHANNELS
    from privdiff.he.stepper import PACKINGS

    if host.forge:
        gr.Markdown(FORGE_MESSAGE)
    gr.Markdown(THREAT_MODEL)
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(elem_id="privdiff_he_prompt", label="Prompt", lines=2)
            negative = gr.Textbox(elem_id="privdiff_he_negative", label="Negative prompt")
            with gr.Row():
                sampler = gr.Radio(list(SAMPLERS), value="ddim", elem_id="privdiff_he_sampler", label="Sampler")
                steps = gr.Number(elem_id="privdiff_he_steps", label="Denoising steps", value=50, precision=0)
                cfg = gr.Number(elem_id="privdiff_he_cfg", label="CFG scale", value=7.5)
                seed = gr.Number(elem_id="privdiff_he_seed",
                                 label="Seed (-1: secret noise, not recorded)", value=-1, precision=0,
                                 info="a seed makes the run reproducible, and lets a worker who knows it rebuild "
                                      "the image")
            with gr.Row():
                width = gr.Number(elem_id="privdiff_he_width", label="Width", value=512, precision=0)
                height = gr.Number(elem_id="privdiff_he_height", label="Height", value=512, precision=0)
                num_images = gr.Number(elem_id="privdiff_he_num_images",
                                       label="Encrypted batch size", value=1, precision=0)
            with gr.Row():
                threshold = gr.Number(elem_id="privdiff_he_threshold",
                                      label="Threshold (plaintext share of the distortion, in [0, 1))", value=0.01)
                packing = gr.Radio(list(PACKINGS), value="dense", elem_id="privdiff_he_packing", label="Packing",
                                   info="dense (safest): the whole latent; sparse: the selected elements and their "
                                        "positions (the worker rebuilds much of the image)")
                channels = gr.Radio(list(CHANNELS), value="reference", elem_id="privdiff_he_channels",
                                    label="HILL channels",
                                    info="reference: filter across the channels as HE-Diffusion; separate: each "
                                         "channel on its own")
            encrypt_offsets = gr.Checkbox(elem_id="privdiff_he_encrypt_offsets",
                                          label="Encrypt the offsets too (the worker never sees the model's "
                                                "predictions; safest)", value=True)
            worker = gr.Textbox(elem_id="privdiff_he_worker",
                                label="Worker HOST:PORT (empty: both roles in this process)",
                                placeholder="127.0.0.1:7000")
            save_prompt = gr.Checkbox(label="Save the prompt, negative prompt and seed in the PNGs (hidden from the "
                                            "worker; left out by default)", value=False,
                                      elem_id="privdiff_he_save_prompt")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="privdiff_he_generate")
                interrupt_button(host)
            status = gr.HTML(elem_id="privdiff_he_status")
        with gr.Column():
            gallery = gr.Gallery(elem_id="privdiff_he_gallery", label="Encrypted samples", columns=4)
            report = gr.Textbox(elem_id="privdiff_he_report", label="Report", lines=8, interactive=False)

    fields = {"prompt": prompt, "negative_prompt": negative, "sampler": sampler, "steps": steps, "cfg": cfg,
              "seed": seed, "width": width, "height": height, "num_images": num_images, "threshold": threshold,
              "packing": packing, "channels": channels, "encrypt_offsets": encrypt_offsets, "worker": worker,
              "save_prompt": save_prompt}

    def run(_task_id, *values):
        form = logic.EncryptedForm(**dict(zip(fields, values, strict=True)))
        files, text, line = logic.encrypted_sample(host, form)
        return [str(f) for f in files], text, status_html(line)

    task = gr.Textbox(visible=False)
    generate.click(fn=job(run, 3), inputs=[task, *fields.values()], outputs=[gallery, report, status],
                   **progress_js("privdiff_he_status"))
