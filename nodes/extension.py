"""The privdiff ComfyUI extension: the list of nodes ComfyUI registers."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .aggregate import PrivdiffDPAggregateEmbeddings
from .audit import (
    PrivdiffAuditAggregateEmbeddings,
    PrivdiffAuditSpectralFinetune,
    PrivdiffAuditStyleTarget,
    PrivdiffAuditTextualInversion,
)
from .dataset import PrivdiffLoadPrivateImages
from .guidance import PrivdiffDPStyleTarget, PrivdiffGuidedSampler, PrivdiffStyleGuider
from .he import PrivdiffEncryptedSampler
from .lora import PrivdiffDPLoRA
from .report import PrivdiffPrivacyReport
from .textual_inversion import PrivdiffDPTextualInversion
from .wavelet import PrivdiffSpectralFinetune, PrivdiffSpectralSample


class PrivdiffExtension(ComfyExtension):
    """privdiff's nodes, under the "privdiff" category."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            PrivdiffLoadPrivateImages,
            PrivdiffDPTextualInversion,
            PrivdiffDPAggregateEmbeddings,
            PrivdiffDPLoRA,
            PrivdiffPrivacyReport,
            PrivdiffDPStyleTarget,
            PrivdiffGuidedSampler,
            PrivdiffStyleGuider,
            PrivdiffSpectralFinetune,
            PrivdiffSpectralSample,
            PrivdiffEncryptedSampler,
            PrivdiffAuditTextualInversion,
            PrivdiffAuditAggregateEmbeddings,
            PrivdiffAuditStyleTarget,
            PrivdiffAuditSpectralFinetune,
        ]
