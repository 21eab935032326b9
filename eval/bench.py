"""`python -m eval.bench` is `python -m bench` (bench/__main__.py), kept under its older name."""
import sys

from bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
