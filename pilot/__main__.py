"""``python -m pilot ...`` is ``pilotctl ...``."""

import sys

from pilot.cli import main

sys.exit(main())
