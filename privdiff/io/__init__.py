"""Files and devices, below every method (layer 1): what touches the disk, untrusted input or the hardware.

``atomic`` (atomic writes, private folders), ``images`` (private image loading: each file read once, its
digest and pixels from the same bytes), ``untrusted`` / ``untrusted_tensors`` (parsing files a user hands
in), ``image_output`` (writing sampled images), ``batching`` (padded batches), ``devices`` (torch devices).
Imports only ``privdiff.errors``; no model, method or front.
"""
