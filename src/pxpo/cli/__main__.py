"""``python -m pxpo.cli``: the same command as ``pxpo`` (torchrun starts workers this way)."""

import sys

from . import main

sys.exit(main())
