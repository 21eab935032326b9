"""`python -m eval.bench ...` runs `python -m bench ...`."""
import sys

from bench.__main__ import main

sys.exit(main())
