"""``python -m batchsync``: the same as the ``batchsync`` command."""

import sys

from batchsync.cli import main

sys.exit(main())
