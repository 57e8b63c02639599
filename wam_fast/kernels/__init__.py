"""Triton kernels of wam_fast, installed as ``wam_fast.kernels``.

Only ``@triton.jit`` kernels and their launch helpers live here, one file per op, named like the op
(``adaln_modulate.py`` <-> ``wam_fast.ops.adaln_modulate``). Import triton inside these files only,
so ``import wam_fast`` never pulls it in. On a machine without a GPU, run them with TRITON_INTERPRET=1.
"""
