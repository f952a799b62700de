"""The ``privdiff`` command line (layer 5): ``main`` builds the parser from one module per command group.

``arguments`` holds the argument types, limits and option groups every group shares; ``releasing`` what every
release command does with them (ledger request, output plan, DP parameters, JSON summary). Command modules:
``privacy`` (privacy, ledger), ``tools`` (embedding), ``textual_inversion`` (ti-aggregate), ``aggregate``,
``guidance``, ``wavelet``, ``he``. Heavy imports (torch, diffusers) stay inside the commands, so the
accountant commands start fast.
"""
