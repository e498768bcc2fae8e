"""`python -m pecsched` runs the `pecsched` command."""

import sys

from pecsched.cli import main

sys.exit(main())
