"""``python -m privdiff.cli``: the ``privdiff`` command."""

import sys

from privdiff.cli.main import main

sys.exit(main())
