"""Run the `lamina` command as `python -m lamina`."""

import sys

from lamina.cli import main

sys.exit(main())
