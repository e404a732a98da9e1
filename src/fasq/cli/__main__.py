"""`python -m fasq.cli`."""

import sys

from . import main

sys.exit(main())
