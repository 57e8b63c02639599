"""Packaging for wam_fast.

Installs the pure-Python package everywhere. The CUDA extension ``wam_fast._C`` (csrc/) is built
only where it can be: see ``cuda_build_reason``. Under pip's default build isolation torch is not
importable here, so the extension is skipped; that is intended on CPU machines. On a GPU machine
with a CUDA torch installed, build it with ``pip install --no-build-isolation -e .``.
"""
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    # Parsed, not imported: importing the package here would need its dependencies.
    with open(os.path.join(ROOT, "wam_fast", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def cuda_build_reason(env=None, root=ROOT):
    """None when the CUDA extension should be built here, else one line saying why not."""
    env = os.environ if env is None else env
    if env.get("WAM_FAST_SKIP_CUDA_BUILD") == "1":
        return "WAM_FAST_SKIP_CUDA_BUILD=1"
    # The kernel bodies (csrc/*.cu, pure CUDA) become an extension through csrc/binding.cpp.
    if not os.path.exists(os.path.join(root, "csrc", "binding.cpp")):
        return "csrc/binding.cpp is missing (a partial source tree?)"
    try:
        import torch
    except ImportError:
        return ("torch is not importable while building (pip's build isolation hides it; "
                "use pip install --no-build-isolation)")
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:  # torch looks at CUDA_HOME / CUDA_PATH, then nvcc on PATH
        return "nvcc not found (set CUDA_HOME)"
    return None


def cuda_extension():
    """(ext_modules, cmdclass) for the CUDA build, or empty ones when it is skipped."""
    reason = cuda_build_reason()
    if reason is not None:
        # One quiet line (pip shows it with -v): the pure-Python package is complete without _C.
        print(f"wam_fast: not building the CUDA extension: {reason}", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = [os.path.join("csrc", "binding.cpp")] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    ext = CUDAExtension(
        name="wam_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # The C++ standard comes from torch; target GPUs from TORCH_CUDA_ARCH_LIST (default: those present).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":
    from setuptools import find_packages, setup

    ext_modules, cmdclass = cuda_extension()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        long_description = f.read()

    setup(
        name="wam_fast",
        version=read_version(),
        description="Fast inference and distillation for world action models (video + action diffusion transformers)",
        long_description=long_description,
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["wam_fast", "wam_fast.*"]),
        install_requires=[
            "torch>=2.4",  # loose on purpose: an installed (CPU or CUDA) torch satisfies it
            'triton>=3.0; platform_system == "Linux" and platform_machine == "x86_64"',
            "numpy",
            "safetensors",
            "nvidia-ml-py",
            "tqdm",  # the distillation trainer's progress bar
        ],
        extras_require={
            # diffusers: the CogVideoX equivalence test; metaworld: the smoke run of python -m wam_fast.eval
            "test": ["pytest", "pytest-benchmark", "hypothesis", "diffusers", "transformers", "matplotlib", "metaworld",
                     "packaging", "websockets>=13", "msgpack"],
            "diffusers": ["diffusers"],
            "pipeline": ["transformers", "diffusers"],  # wam_fast.WAMPipeline: T5 text encoder, CogVideoX VAE
            "serve": ["transformers", "diffusers", "websockets>=13", "msgpack"],  # python -m wam_fast.serve
            "bench": ["matplotlib"],  # the PNG chart of python -m wam_fast.bench
            "sim": ["metaworld", "packaging", "matplotlib"],  # python -m wam_fast.eval (Meta-World)
            "flash": ["flash-attn"],
            "xformers": ["xformers"],
            "tensorrt": ["torch-tensorrt"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
