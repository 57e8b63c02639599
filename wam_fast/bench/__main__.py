"""``python -m wam_fast.bench``: see wam_fast.bench.cli."""
from wam_fast.bench.cli import main

if __name__ == "__main__":
    main()
