"""`python -m pecsched` runs the `pecsched` command."""

import sys

from pecsched.orphans import die_with_parent

die_with_parent()  # before anything else: a cluster's child goes when its parent goes

from pecsched.cli import main  # noqa: E402

sys.exit(main())
