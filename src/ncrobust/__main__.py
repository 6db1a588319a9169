"""``python -m ncrobust``: the ``ncrobust`` command (:mod:`ncrobust.cli`)."""

import sys

from ncrobust.cli import main

sys.exit(main())
