import sys

from wam_fast.serve.cli import main

sys.exit(main())
