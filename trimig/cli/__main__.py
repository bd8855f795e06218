"""``python -m trimig.cli``: the ``trimig`` command."""

import sys

from . import main

sys.exit(main())
