"""``python -m loradeploy.cli``: the ``loradeploy`` command."""

import sys

from . import main

sys.exit(main())
