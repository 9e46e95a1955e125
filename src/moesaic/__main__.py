"""``python -m moesaic`` works like the ``moesaic`` command."""

import sys

from moesaic.cli import main

sys.exit(main())
