"""``python -m wam_fast.eval``: Meta-World MT1 fidelity of distilled students (``wam_fast.eval.fidelity``)."""
import sys

from wam_fast.eval.fidelity import main

sys.exit(main())
