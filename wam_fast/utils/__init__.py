"""Helpers every layer shares, below the ops: tensor checks, optional packages, NVML, the environment a
number was measured in, atomic file writes, module swaps and handler registries. Nothing here imports
another part of wam_fast, so any layer may import it."""
