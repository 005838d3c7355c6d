"""``python -m quant``: see ``quant.cli``."""

import sys

from quant.cli import main

sys.exit(main())
