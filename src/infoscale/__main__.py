"""``python -m infoscale``: the command line without the installed ``infoscale`` script."""

import sys

from .cli import main

sys.exit(main())
