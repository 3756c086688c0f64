"""`python -m headserve`: the same dispatcher as the `headserve` console script."""

import sys

from headserve.cli import main

sys.exit(main())
