"""Optional packages: found without importing them (a broken install cannot crash a caller), each
with what it is for and the line that installs it."""
from __future__ import annotations

import importlib.util
from typing import Optional

# name -> python module, what wam_fast uses it for, install line
OPTIONAL_PACKAGES = {
    "diffusers": {"module": "diffusers", "use": "load CogVideoX / VideoVLA weights",
                  "install": 'pip install "wam_fast[diffusers]"'},
    "transformers": {"module": "transformers", "use": "the T5 text encoder of wam_fast.WAMPipeline",
                     "install": 'pip install "wam_fast[pipeline]"'},
    "flash-attn": {"module": "flash_attn", "use": "attention backend (CUDA)",
                   "install": "pip install flash-attn --no-build-isolation"},
    "xformers": {"module": "xformers", "use": "attention backend (CUDA)", "install": "pip install xformers"},
    "torch-tensorrt": {"module": "torch_tensorrt", "use": "TensorRT compile backend",
                       "install": "pip install torch-tensorrt"},
    "metaworld": {"module": "metaworld", "use": "simulated success-rate evaluation",
                  "install": 'pip install "wam_fast[sim]"'},
    "nvidia-ml-py": {"module": "pynvml", "use": "GPU driver and clocks in benchmarks",
                     "install": "pip install nvidia-ml-py"},
    "matplotlib": {"module": "matplotlib", "use": "charts of bench and eval results",
                   "install": 'pip install matplotlib (or pip install "wam_fast[bench]")'},
    "websockets": {"module": "websockets", "use": "the policy server (python -m wam_fast.serve)",
                   "install": 'pip install "wam_fast[serve]"'},
    "msgpack": {"module": "msgpack", "use": "the policy server's wire format (msgpack + numpy)",
                "install": 'pip install "wam_fast[serve]"'},
    "triton": {"module": "triton", "use": "Triton kernels", "install": "pip install triton; Linux x86-64"},
}


def installed(module: str) -> bool:
    """Whether a python module is importable, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package: treat as missing
        return False


def missing_reason(name: str) -> Optional[str]:
    """None when the optional package ``name`` is installed, else one line naming it and its install line."""
    package = OPTIONAL_PACKAGES[name]
    if installed(package["module"]):
        return None
    return f"{name} is not installed (python module {package['module']!r}): {package['install']}"
