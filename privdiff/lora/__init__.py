"""DP-LoRA: DP-SGD on low-rank adapters of a Stable Diffusion UNet's attention (and feed-forward) layers.

- ``adapters``: the LoRA layers put around the UNet's frozen Linear layers;
- ``files``: the adapters as a kohya-layout LoRA file (ComfyUI's LoraLoader, A1111's ``<lora:…>``, diffusers'
  ``load_lora_weights``), with the privacy report in its header.
"""
