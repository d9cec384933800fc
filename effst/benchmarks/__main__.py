"""``python -m effst.benchmarks [SUITE ...] [options]`` — the same as ``effst bench``."""
import sys

from effst.benchmarks import main

sys.exit(main())
