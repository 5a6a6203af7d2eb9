"""``python -m benchmarks``: the same as the ``mole-bench`` console script."""

import sys

from benchmarks.run import main

sys.exit(main())
