"""Spectral DP generation (arXiv 2602.23262): a DP autoregressive prior over coarse Haar-wavelet tokens.

``transform`` (Haar DWT), ``tokenizer`` (per-scale patch codebooks learned on public images), ``prior``
(a decoder-only transformer over the token sequence), ``training`` (public pre-training and DP-SGD
fine-tuning), ``upsample`` (public super-resolution: spandrel upscalers or an SD img2img pass).
Only the fine-tuned prior carries the guarantee; sampling and upsampling are post-processing.
"""
