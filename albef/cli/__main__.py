"""``python -m albef.cli COMMAND ...`` (what torchrun runs): the ``albef`` command."""

import sys

from albef.cli import main

sys.exit(main())
