"""``python -m wam_fast.eval --smoke`` of one task into a temporary directory, for the Meta-World tests."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from wam_fast.eval import fidelity


def smoke_run(tmp_path_factory, task: str) -> SimpleNamespace:
    """Run the smoke version of ``task`` (skipped without Meta-World); its root, argv and results JSON."""
    if importlib.util.find_spec("metaworld") is None:
        pytest.skip('Meta-World is not installed: pip install "wam_fast[sim]"')
    root = tmp_path_factory.mktemp(task)
    argv = ["--task", task, "--smoke", "--out", str(root / "work"), "--results", str(root / "results"),
            "--no-progress"]
    threads = torch.get_num_threads()
    try:
        assert fidelity.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the CLI sets its --threads
    return SimpleNamespace(root=root, argv=argv, json=root / "results" / f"metaworld-{task}.json")
