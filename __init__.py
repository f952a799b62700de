"""ComfyUI entry point of the privdiff node pack (the library itself is the `privdiff` package).

Importing the pack does no heavy work: the nodes (and torch-heavy modules) load when ComfyUI asks
for the extension.
"""

import sys
from pathlib import Path

_PACK = str(Path(__file__).resolve().parent)
if _PACK not in sys.path:  # a git clone in custom_nodes/ without `pip install`: find `privdiff`
    sys.path.append(_PACK)


async def comfy_entrypoint():
    """ComfyUI ≥ 0.3.48 calls this to get the extension and its nodes."""
    from .nodes.extension import PrivdiffExtension

    return PrivdiffExtension()
