"""Audit: check a release's guarantee empirically with canaries (one run, an empirical lower bound on epsilon).
Not a release: nothing is written and no ledger is charged."""

from __future__ import annotations

from ..logic import audit as logic
from ..logic import spectral
from ..logic.common import FORGE_MESSAGE, Host
from .widgets import Job, interrupt_button, progress_js, status_html

TITLE = "Audit"

ABOUT = ("Run a release's own mechanism once on your images plus random canaries (each in with probability 1/2) and "
         "see how many an attacker tells apart: that gives an empirical **lower bound** on epsilon at the chosen "
         "confidence (Steinke, Nasr & Jagielski 2023). A bound at or below the claimed epsilon is what a correct "
         "release shows; one above it means the implementation leaks more than its proof allows. Loose for DP-SGD "
         "with few canaries. Not a release: nothing is written and no ledger is charged.")

KIND_HELP = ("ti-aggregate: DP Textual Inversion (dpagg); dpsgd-ti: DP Textual Inversion (dpsgd); aggregate: DP "
             "aggregate of per-image embedding files; guidance-target: DP style target; wavelet-finetune: spectral "
             "DP fine-tune (the names of `privdiff audit`)")

SHOWN = {"images": {"ti-aggregate", "dpsgd-ti", "guidance-target", "wavelet-finetune"},
         "training": {"ti-aggregate", "dpsgd-ti", "wavelet-finetune"},
         "textual_inversion": {"ti-aggregate", "dpsgd-ti"}, "aggregate": {"aggregate"},
         "target": {"guidance-target"}, "spectral": {"wavelet-finetune"}}
"""Which kinds each group of fields serves."""


def build(host: Host, job: Job) -> None:
    import gradio as gr

    if host.forge:
        gr.Markdown(FORGE_MESSAGE)
    gr.Markdown(ABOUT)
    with gr.Row():
        with gr.Column():
            kind = gr.Radio(list(logic.KINDS), value="ti-aggregate", elem_id="privdiff_audit_kind",
                            label="Release audited", info=KIND_HELP)
            with gr.Column(visible=True) as images_group:
                images = gr.Textbox(elem_id="privdiff_audit_images", label="Audit: private image folder",
                                    placeholder="/path/to/private/images")
            with gr.Column(visible=False) as aggregate_group:
                embeddings = gr.Textbox(elem_id="privdiff_audit_embeddings",
                                        label="Audit: folder of per-image embedding files")
                one_image = gr.Checkbox(elem_id="privdiff_audit_one_image_per_file",
                                        label="Audit: every file was trained on exactly one image", value=False)
                center = gr.Textbox(elem_id="privdiff_audit_center", label="Audit: public centre embedding file")
                noise = gr.Number(elem_id="privdiff_audit_noise_multiplier",
                                  label="Audit: noise multiplier (0: calibrate for epsilon)", value=0.0)
            with gr.Column(visible=False) as target_group:
                encoder = gr.Textbox(elem_id="privdiff_audit_image_encoder", label="Audit: image encoder",
                                     placeholder="/path/to/clip-vit-large-patch14")
            with gr.Column(visible=False) as spectral_group:
                prior = gr.Dropdown(spectral.prior_files(host.priors_dir()), elem_id="privdiff_audit_prior",
                                    label="Audit: public prior (models/privdiff_priors, or a path)",
                                    allow_custom_value=True)
            with gr.Row():
                epsilon = gr.Number(elem_id="privdiff_audit_epsilon", label="Audit: claimed epsilon", value=4.0)
                delta = gr.Number(elem_id="privdiff_audit_delta", label="Audit: delta (below 1/(N + canaries))",
                                  value=1e-5)
                sample_rate = gr.Number(elem_id="privdiff_audit_sample_rate", label="Audit: sample rate q", value=1.0)
                clip_norm = gr.Number(elem_id="privdiff_audit_clip_norm", label="Audit: clip norm C", value=1.0)
            with gr.Row(visible=True) as ti_group:
                vectors = gr.Slider(1, 16, value=1, step=1, elem_id="privdiff_audit_vectors",
                                    label="Audit: vectors per token")
                init_word = gr.Textbox(elem_id="privdiff_audit_init_word", label="Audit: initialisation word",
                                       value="style")
                batch_size = gr.Number(elem_id="privdiff_audit_batch_size", label="Audit: batch size", value=4,
                                       precision=0)
                resolution = gr.Number(elem_id="privdiff_audit_resolution",
                                       label="Audit: training resolution (0: the model's)", value=0, precision=0)
            with gr.Row(visible=True) as training_group:
                steps = gr.Number(elem_id="privdiff_audit_steps", label="Audit: training steps", value=200,
                                  precision=0)
                learning_rate = gr.Number(elem_id="privdiff_audit_learning_rate", label="Audit: learning rate",
                                          value=5e-3)
            with gr.Row():
                canaries = gr.Number(elem_id="privdiff_audit_canaries", label="Canaries M", value=64, precision=0)
                confidence = gr.Number(elem_id="privdiff_audit_confidence", label="Confidence of the bound",
                                       value=0.95)
            with gr.Row():
                run_button = gr.Button("Run audit", variant="primary", elem_id="privdiff_audit_run")
                interrupt_button(host)
        with gr.Column():
            status = gr.HTML(elem_id="privdiff_audit_status")
            result = gr.Textbox(elem_id="privdiff_audit_result", label="Audit result", lines=20, interactive=False)

    fields = {"kind": kind, "images": images, "embeddings": embeddings, "one_image_per_file": one_image,
              "center": center, "image_encoder": encoder, "prior": prior, "epsilon": epsilon, "delta": delta,
              "noise_multiplier": noise, "sample_rate": sample_rate, "clip_norm": clip_norm, "n_vectors": vectors,
              "init_word": init_word, "steps": steps, "learning_rate": learning_rate, "batch_size": batch_size,
              "resolution": resolution, "canaries": canaries, "confidence": confidence}
    groups = {"images": images_group, "training": training_group, "textual_inversion": ti_group,
              "aggregate": aggregate_group, "target": target_group, "spectral": spectral_group}

    def show(chosen: str) -> list:
        return [gr.update(visible=chosen in SHOWN[name]) for name in groups]

    def run(_task_id, *values):
        text, line = logic.audit(host, logic.AuditForm(**dict(zip(fields, values, strict=True))))
        return text, status_html(line)

    kind.change(fn=show, inputs=[kind], outputs=list(groups.values()))
    run_button.click(fn=job(run, 2), inputs=[gr.Textbox(visible=False), *fields.values()], outputs=[result, status],
                     **progress_js("privdiff_audit_status"))
