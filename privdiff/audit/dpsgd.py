"""What the DP-SGD audits share: the attack.

The attack is the loss difference: canary i scores L_i(public start) − L_i(released weights), how much the release
learned the canary (a member's loss drops more). Measured on the spectral prior (tiny test prior, noise removed,
ε = 1, full batch, 30 steps, M = 64 to 256): AUC 0.93 to 1.0 and the stronger bound, against 0.84 to 0.93 for the
alignment of the update with each canary's clipped gradient at the start (centred on the canaries' mean, even
restricted to the coordinates Adam's sign does not drown); the alignment wins only for a handful of steps.
"""

from __future__ import annotations

import numpy as np
import torch

from privdiff.audit.result import AuditResult, audit_result
from privdiff.privacy.report import PrivacyReport

ATTACK = "loss difference: each canary's training loss at the public start minus at the released weights"


def bound_of_losses(kind: str, report: PrivacyReport, before: torch.Tensor, after: torch.Tensor,
                    included: np.ndarray, confidence: float) -> AuditResult:
    """The audit's result from each canary's loss ``before`` and ``after`` the run, against the run's ``report``."""
    scores = (before.detach().to(torch.float64) - after.detach().to(torch.float64)).cpu().numpy()
    return audit_result(kind, ATTACK, report, scores, included, confidence)
