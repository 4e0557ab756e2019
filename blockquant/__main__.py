"""``python -m blockquant ...`` runs the command line (see :mod:`blockquant.cli`)."""
import sys

from .cli import main

sys.exit(main())
