"""``python -m privdiff`` (and ``torchrun -m privdiff``): the ``privdiff`` command."""

import sys

from privdiff.cli.main import main

sys.exit(main())
