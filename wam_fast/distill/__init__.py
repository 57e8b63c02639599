"""Distillation of a multi-step world action model into a 1-4 step student (``python -m wam_fast.distill``).

Modules: ``data`` (the on-disk latent dataset, synthetic data, teacher rollout), ``objectives``
(teacher training, shortcut and consistency distillation, ``make_student``), ``trainer`` (EMA,
checkpoints, exact resume, DDP / FSDP2), ``evaluate`` (student vs teacher from the same noise) and
``cli`` (the command line). Nothing is imported here, so ``import wam_fast.distill`` stays light.
"""
