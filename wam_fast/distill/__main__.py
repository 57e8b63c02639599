"""``python -m wam_fast.distill``: see ``wam_fast.distill.cli``."""
import sys

from wam_fast.distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
