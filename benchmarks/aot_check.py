"""Ahead-of-time compile of every Triton kernel x config the dispatch picks at the W1 shapes, for sm_89
and sm_90a, on a machine without a GPU. Fails on a compile error, shared memory over the arch's
per-block limit, or a register spill.

    python benchmarks/aot_check.py [--jobs N] [--only KERNEL ...] [--arch sm_89|sm_90a ...]

How: each row of LAUNCHES calls the real launcher (``wam_fast.kernels.<module>``) on CPU tensors at one
W1 shape inside ``gpu_arch.target_arch(arch)``; the launch is intercepted (``JITFunction.run``), so
what is compiled is exactly what dispatch would launch there: the config, the constexpr flags and
Triton's argument specialization (16-divisible sizes and strides). Identical compiles are done once.
Each compile is ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 89 | 90, 32))``; shared
memory is the compiled kernel's ``metadata.shared``, registers and spills come from ``ptxas -v`` (the
ptxas Triton itself uses) run on the generated PTX. One line per kernel / config / arch.

Adding a kernel or a shape: one row in LAUNCHES,
    (module in wam_fast/kernels/, label, shapes, call)
where ``call(k, s)`` runs the launcher of module ``k`` for one shape ``s`` of ``shapes`` (a tuple from
the W1 constants below or your own); make its inputs with bf16(...), fp8(...), f32(...), i32(...)
(torch.empty on the CPU: nothing is touched, tens of MB are fine). E.g.
    ("quantize_rowwise", "ffn hidden", TOKENS, lambda k, m: k.quantize_rowwise(bf16(m, FFN), True, False)),
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

os.environ.pop("TRITON_INTERPRET", None)  # the launchers must take their GPU paths (set before triton loads)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)

import torch  # noqa: E402

# ---- W1 ("videovla-5b"): hidden 3072, 48 heads x 64, FFN 12288; frame pass 256 tokens, cached step
# 774 queries over 1256 keys, uncached 1256; classifier-free guidance doubles the rows (batch 2).
HIDDEN, HEADS, HEAD_DIM, FFN = 3072, 48, 64, 12288
TOKENS = (256, 512, 774, 1256, 1548, 2512)                              # GEMM rows M (batch x tokens)
SEQS = ((1, 256), (2, 256), (1, 774), (2, 774), (1, 1256), (2, 1256))   # (batch, tokens)
ATTN = ((1, 256, 256), (2, 256, 256), (1, 774, 1256), (2, 774, 1256), (1, 1256, 1256), (2, 1256, 1256))
TEXT = 226  # text tokens: rope covers the tokens after them
CACHED_ATTN = ((1, 256, 994), (2, 256, 994), (1, 774, 1256), (2, 774, 1256), (1, 774, 1768), (2, 774, 1768))
# ^ (batch, queries, keys): frame pass over text + 3 slots; cached step with 0 or 2 history frames


def bf16(*shape):
    return torch.empty(shape, dtype=torch.bfloat16)


def fp8(*shape):
    return torch.empty(shape, dtype=torch.float8_e4m3fn)


def f32(*shape):
    return torch.empty(shape, dtype=torch.float32)


def i32(*shape):
    return torch.zeros(shape, dtype=torch.int32)  # token-set ids: read by the launchers' checks


def _adaln(k, s, fp8_out):
    b, n = s
    return k.adaln_modulate(bf16(b, n, HIDDEN), bf16(b, 2, HIDDEN), bf16(b, 2, HIDDEN), i32(n), bf16(HIDDEN),
                            bf16(HIDDEN), 1e-5, fp8=fp8_out, interpret=False)


def _gated(k, s, fp8_out):
    b, n = s
    mod = [bf16(b, 2, HIDDEN) for _ in range(3)]
    return k.gated_residual_adaln(bf16(b, n, HIDDEN), bf16(b, n, HIDDEN), *mod, i32(n), bf16(HIDDEN), bf16(HIDDEN),
                                  1e-5, fp8=fp8_out, interpret=False)


def _qk_norm_rope(k, s):
    b, n = s
    qk = [bf16(b, HEADS, n, HEAD_DIM) for _ in range(2)]
    norms = [bf16(HEAD_DIM) for _ in range(4)]
    rope = max(n - TEXT, 1)
    return k.qk_norm_rope(*qk, *norms, f32(rope, HEAD_DIM), f32(rope, HEAD_DIM), n - rope, n, 1e-6)


def _qk_norm_rope_into_cache(k, s):
    """The KV cache's call: k and v written into a (B, H, keys, hd) buffer's slice in the same launch."""
    b, n = s
    q, k_in, v = (bf16(b, n, 3, HEADS, HEAD_DIM)[:, :, i].transpose(1, 2) for i in range(3))  # qkv views
    keys, values = bf16(b, HEADS, n + 512, HEAD_DIM), bf16(b, HEADS, n + 512, HEAD_DIM)
    norms = [bf16(HEAD_DIM) for _ in range(4)]
    rope = max(n - TEXT, 1)
    return k.qk_norm_rope(q, k_in, *norms, f32(rope, HEAD_DIM), f32(rope, HEAD_DIM), n - rope, n, 1e-6,
                          k_out=keys[:, :, 512:], v=v, v_out=values[:, :, 512:])


def _fp8_linear(k, m, n, kdim):
    return k.fp8_linear(fp8(m, kdim), f32(m, 1), fp8(n, kdim), f32(n), bf16(n), torch.bfloat16)


# (module in wam_fast/kernels/, label, shapes, call(kernel module, shape)): every launch dispatch makes at W1.
LAUNCHES: List[Tuple[str, str, Sequence, Callable]] = [
    ("adaln_modulate", "bf16 out", SEQS, lambda k, s: _adaln(k, s, False)),
    ("adaln_modulate", "fp8 out", SEQS, lambda k, s: _adaln(k, s, True)),
    ("gated_residual_adaln", "bf16 out", SEQS, lambda k, s: _gated(k, s, False)),
    ("gated_residual_adaln", "fp8 out", SEQS, lambda k, s: _gated(k, s, True)),
    ("qk_norm_rope", "q,k", SEQS, _qk_norm_rope),
    ("qk_norm_rope", "q,k + K/V into the cache", SEQS, _qk_norm_rope_into_cache),
    ("quantize_rowwise", "attention out", TOKENS, lambda k, m: k.quantize_rowwise(bf16(m, HIDDEN), False, False)),
    ("quantize_rowwise", "ffn hidden, gelu", TOKENS, lambda k, m: k.quantize_rowwise(bf16(m, FFN), True, False)),
    ("gated_residual", "block out", SEQS, lambda k, s: k.gated_residual(bf16(s[0], s[1], HIDDEN),
                                                                        bf16(s[0], s[1], HIDDEN),
                                                                        bf16(s[0], 2, HIDDEN), i32(s[1]), False)),
    ("attention", "full mask", ATTN, lambda k, s: k.attention(bf16(s[0], HEADS, s[1], HEAD_DIM),
                                                              bf16(s[0], HEADS, s[2], HEAD_DIM),
                                                              bf16(s[0], HEADS, s[2], HEAD_DIM))),
    # the KV cache's calls: the frame pass (256 queries over text + frame slots) and the cached step
    # (774 noisy queries over all 1256 keys), segment ids on: the TEMPORAL variant
    ("attention", "temporal (KV cache)", CACHED_ATTN, lambda k, s: k.attention(
        bf16(s[0], HEADS, s[1], HEAD_DIM), bf16(s[0], HEADS, s[2], HEAD_DIM), bf16(s[0], HEADS, s[2], HEAD_DIM),
        i32(s[1]), i32(s[2]), temporal=True)),
    # other families' heads, 16 of them: GR00T-style 48, 96 and 120 run a padded tile (BLOCK_D = next power of
    # two); 128 with a grid over one wave (B=2) and under it
    ("attention", "other head_dim", ((1, 774, 1256, 48), (1, 774, 1256, 96), (1, 774, 1256, 120),
                                     (1, 774, 1256, 128), (2, 1256, 1256, 128)),
     lambda k, s: k.attention(bf16(s[0], 16, s[1], s[3]), bf16(s[0], 16, s[2], s[3]), bf16(s[0], 16, s[2], s[3]))),
    ("ffn_gelu", "ffn-in", TOKENS, lambda k, m: k.ffn_gelu(bf16(m, HIDDEN), bf16(FFN, HIDDEN), bf16(FFN))),
    ("fp8_linear", "qkv", TOKENS, lambda k, m: _fp8_linear(k, m, 3 * HIDDEN, HIDDEN)),
    ("fp8_linear", "out", TOKENS, lambda k, m: _fp8_linear(k, m, HIDDEN, HIDDEN)),
    ("fp8_linear", "ffn-in", TOKENS, lambda k, m: _fp8_linear(k, m, FFN, HIDDEN)),
    ("fp8_linear", "ffn-out", TOKENS, lambda k, m: _fp8_linear(k, m, HIDDEN, FFN)),
]


# ---- interception: what a launcher would launch, as compile inputs -----------------------------------
class Job(NamedTuple):
    kernel: str      # module.function
    fn: object       # the JITFunction
    arch: object     # gpu_arch.GpuArch
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict    # launch options: num_warps, num_stages, ...
    config: str      # human-readable: the int constexprs, warps, stages
    flags: str       # the constexpr flags that are on


class Result(NamedTuple):
    error: Optional[str]
    registers: int = 0
    spill_bytes: int = 0   # spill stores + spill loads
    stack_bytes: int = 0
    shared: int = 0


def capture_launches(call: Callable[[], object]) -> List[tuple]:
    """Run ``call`` with JITFunction.run replaced: returns (JITFunction, args, kwargs) of every launch."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        call()
    finally:
        JITFunction.run = original
    return launches


def make_job(kernel: str, fn, args, kwargs, arch) -> Job:
    """Bind a launch the way JITFunction.run does (Triton 3.x internals), for ``arch`` instead of the
    active driver's device."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch.capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    names = [p.name for p in fn.params]
    declared = {p.name for p in fn.params if p.is_constexpr}  # not the int args Triton specialized to 1
    named = {names[path[0]]: value for path, value in constexprs.items()
             if len(path) == 1 and names[path[0]] in declared}
    sizes = " ".join(f"{k}={v}" for k, v in named.items() if isinstance(v, int) and not isinstance(v, bool))
    flags = ",".join(k for k, v in named.items() if v is True)
    config = f"{sizes} w{options.num_warps} s{options.num_stages}"
    return Job(kernel, fn, arch, signature, constexprs, attrs, options.__dict__, config, flags)


def collect_jobs(archs, only: Sequence[str] = ()) -> Tuple[List[Job], Dict[tuple, List[str]]]:
    """Every distinct compile of LAUNCHES on ``archs``, and the W1 launches behind each."""
    import importlib

    from wam_fast.kernels.gpu_arch import target_arch

    jobs: Dict[tuple, Job] = {}
    uses: Dict[tuple, List[str]] = {}
    for module, label, shapes, call in LAUNCHES:
        if only and module not in only:
            continue
        kmod = importlib.import_module(f"wam_fast.kernels.{module}")
        for arch in archs:
            for shape in shapes:
                with target_arch(arch):
                    launches = capture_launches(lambda: call(kmod, shape))
                if not launches:
                    raise RuntimeError(f"{module} {label} at {shape}: the launcher launched no kernel")
                for fn, args, kwargs in launches:
                    job = make_job(module, fn, args, kwargs, arch)
                    key = (job.kernel, arch.name, repr(job.signature), repr(job.constexprs), repr(job.attrs),
                           repr(sorted(job.options.items())))
                    jobs.setdefault(key, job)
                    uses.setdefault(key, []).append(f"{label} {shape}")
    return list(jobs.values()), {k: v for k, v in uses.items()}


# ---- compile + resource report ---------------------------------------------------------------------------
def _ptxas(arch) -> str:
    try:  # the ptxas Triton compiles with (Triton 3.x); nvcc's on PATH otherwise
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch.capability).path
    except (ImportError, AttributeError, TypeError):
        from triton import knobs
        return knobs.nvidia.ptxas.path


def ptxas_usage(ptx: str, arch) -> Tuple[int, int, int]:
    """(registers, spill store + load bytes, stack frame bytes) from ``ptxas -v`` on the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([_ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch.name}", src,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"ptxas -v failed:\n{log}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not read registers / spills from ptxas -v:\n{log}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2)), int(stack.group(1)) if stack else 0


def compile_job(job: Job) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        src = ASTSource(job.fn, job.signature, job.constexprs, job.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", job.arch.capability, 32), options=job.options)
        regs, spills, stack = ptxas_usage(kernel.asm["ptx"], job.arch)
        return Result(None, regs, spills, stack, int(kernel.metadata.shared))
    except Exception as e:  # a compile error is a result to report, not a crash of the check
        return Result(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


_JOBS: List[Job] = []  # read by forked workers (jobs hold JITFunctions, which do not pickle)


def _compile_index(i: int) -> Result:
    return compile_job(_JOBS[i])


def compile_all(jobs: List[Job], processes: int) -> List[Result]:
    global _JOBS
    _JOBS = jobs
    if processes <= 1 or len(jobs) <= 1:
        return [compile_job(j) for j in jobs]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return pool.map(_compile_index, range(len(jobs)), chunksize=1)


def failures(job: Job, res: Result) -> List[str]:
    """Why this compile fails the check (empty: it passes)."""
    if res.error:
        return [f"compile error: {res.error}"]
    why = []
    if res.shared > job.arch.smem_per_block:
        why.append(f"shared memory {res.shared} B > {job.arch.name} limit {job.arch.smem_per_block} B")
    if res.spill_bytes:
        why.append(f"register spills: {res.spill_bytes} B of spill stores + loads ({res.registers} registers)")
    return why


def merge(group: List[Tuple[Job, Result, List[str]]]) -> Tuple[Job, Result, List[str]]:
    """One kernel / config / arch compiled for several argument specializations (16-divisible sizes):
    the first error, else the largest registers, spills and shared memory."""
    job = group[0][0]
    uses = [u for _, _, us in group for u in us]
    errors = [r for _, r, _ in group if r.error]
    if errors:
        return job, errors[0], uses
    res = Result(None, *(max(getattr(r, f) for _, r, _ in group)
                         for f in ("registers", "spill_bytes", "stack_bytes", "shared")))
    return job, res, uses


def format_line(job: Job, res: Result, uses: List[str], compiles: int) -> str:
    usage = (f"regs {res.registers:3d}  spill {res.spill_bytes:5d} B  smem {res.shared:6d}/{job.arch.smem_per_block} B"
             if not res.error else "-")
    flags = f" [{job.flags}]" if job.flags else ""
    bad = failures(job, res)
    return (f"{'FAIL' if bad else 'ok  '} {job.kernel:30s} {job.arch.name:6s} {job.config}{flags}  {usage}"
            f"  ({compiles} compiles, {len(uses)} W1 launches, e.g. {uses[0]})" + "".join(f"\n     -> {w}" for w in bad))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--only", nargs="*", default=(), help="kernel modules to check (default: all rows)")
    parser.add_argument("--arch", nargs="*", default=("sm_89", "sm_90a"), choices=("sm_89", "sm_90a"))
    args = parser.parse_args(argv)
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        print(f"aot_check: Triton with its NVIDIA backend is required ({e})", file=sys.stderr)
        return 2
    from wam_fast.kernels.gpu_arch import SM89, SM90

    t0 = time.time()
    jobs, uses = collect_jobs([a for a in (SM89, SM90) if a.name in args.arch], args.only)
    if not jobs:
        print(f"aot_check: no launches to compile (--only {' '.join(args.only)}: expected modules of LAUNCHES: "
              f"{sorted({row[0] for row in LAUNCHES})})", file=sys.stderr)
        return 2
    keys = list(uses)
    print(f"aot_check: Triton {triton.__version__}, {len(jobs)} distinct compiles from "
          f"{sum(len(u) for u in uses.values())} W1 launches on {' + '.join(args.arch)}, {args.jobs} processes")
    results = compile_all(jobs, args.jobs)
    groups: Dict[tuple, list] = {}
    for job, res, key in zip(jobs, results, keys):
        groups.setdefault((job.kernel, job.arch.name, job.config, job.flags), []).append((job, res, uses[key]))
    bad = 0
    for name in sorted(groups):
        job, res, launches = merge(groups[name])
        print(format_line(job, res, launches, len(groups[name])))
        bad += bool(failures(job, res))
    print(f"aot_check: {len(groups) - bad} kernel configs ok, {bad} failed, {time.time() - t0:.0f} s")
    if bad:
        print(f"aot_check: FAILED: {bad} kernel configs do not compile, overflow shared memory or spill "
              "(lines marked FAIL above)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
