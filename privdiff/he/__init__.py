"""Encrypted denoising steps (HE-Diffusion, arXiv 2403.05794): CKKS over part of the latent, with TenSEAL.

``ckks``: parameters, the key holder (secret key) and the worker (public context only); ``selection``: the
min-distortion (HILL cost) choice of what to encrypt; ``steps``: scheduler steps as affine updates;
``stepper``: one encrypted step between the two roles; ``protocol``: the wire format and the worker server;
``sampler``: samplers whose scheduler step runs encrypted; ``leak``: what the worker can reconstruct.
"""
