"""``python -m pilot ...`` is ``pilotctl ...``."""

import sys

from pilot.entry import main

sys.exit(main())
