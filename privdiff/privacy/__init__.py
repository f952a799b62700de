"""Differential privacy core (docs/privacy.md), one implementation used by every feature.

- ``accountants``: epsilon of, and sigma calibration for, the Poisson-subsampled Gaussian mechanism
  (dp_accounting PLD, opacus PRV and RDP);
- ``randomness``: the ChaCha20 CSPRNG (256-bit key) and the exact discrete Gaussian sampler;
- ``exact``: the exact arithmetic the samplers share (brackets of exp, floors, the float-exp check);
- ``chacha``, ``device_noise``: the same keystream and sampler in torch ops, drawn on a GPU;
- ``mechanism``: bounding, Poisson sampling, the noisy sum on a fixed grid, the Gaussian aggregate;
- ``report``: the privacy report carried by every DP artifact;
- ``ledger``: the data owner's local budget ledger;
- ``checks``: the shared input checks (one-line PrivdiffError naming the value).

Submodules are imported explicitly (``from privdiff.privacy.accountants import epsilon_for``) so that the
CLI's accountant commands do not pay for importing torch.
"""
