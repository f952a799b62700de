"""DP textual inversion (DPAgg-TI, arXiv 2411.14639, and its DP-SGD baseline) and embedding files.

``textual_inversion`` (batched per-image training), ``dpagg`` (the noisy aggregate), ``dpsgd_ti``, ``methods``
(the method table fronts choose from), ``files`` (every format ComfyUI, A1111 and diffusers load), ``release``
(an embedding through the one release path), ``templates`` (prompt templates).
"""
