"""Stable Diffusion models behind one protocol (layer 2): every method talks to a model only through here.

``protocol`` (SDBackend), ``diffusers_backend`` (its diffusers implementation), ``inject`` /
``init_tokens`` (trainable placeholder tokens), ``registry`` (the model names "small", "tiny",
"tiny-sdxl" and local folders/files), ``single_file`` (original-layout checkpoints, offline), ``tiny``
(random-weight test models), ``small`` / ``small_classifier`` (the shipped small reference model and
its attribute network; their training is ``privdiff.reference``), ``image_encoders`` (CLIP, open_clip
and the small model's encoder), ``sampling`` (DDIM timesteps and classifier-free guided noise).
Imports ``privdiff.io`` and ``privdiff.errors`` only.
"""
