#!/usr/bin/env python3
"""`python cli.py …` from a checkout does what `bake …` does."""

import sys

from bake.cli import main

if __name__ == "__main__":
    sys.exit(main())
