"""``python -m privdiff.demo``: the style demo, then the spectral demo."""

import sys

from privdiff.demo.styles import run

sys.exit(run())
