"""`python -m tggbc ...` (and `torchrun ... -m tggbc eval ...`): the same command line as `tggbc`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
