"""`python -m domubackup`: the same program as the `domubackup` console script (entry.main)."""

import sys

from .entry import main

sys.exit(main())
