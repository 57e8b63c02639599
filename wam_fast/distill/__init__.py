"""Distillation of a multi-step world action model into a 1-4 step student (``python -m wam_fast.distill``).

Modules, bottom to top:
- the dataset: ``dataset_format`` (fields, dtypes, the index), ``dataset_reader`` (``LatentDataset``),
  ``data`` (``DatasetWriter``, ``write_dataset``; re-exports the reader and the format), ``synthetic``
  (synthetic tasks), ``rollout`` (teacher targets for a conditions-only dataset);
- ``objectives`` (teacher training, shortcut and consistency distillation, ``make_student``);
- the trainer: ``train_config`` (``TrainConfig``), ``distributed`` (ranks, DDP / FSDP2), ``train_state``
  (the on-disk run state), ``checkpoints`` (resume, atomic saves, ``final/``), ``metrics`` (JSONL,
  TensorBoard, progress), ``ema``, and ``trainer`` (the loop, ``train``);
- ``evaluate`` (student vs teacher from the same noise);
- the command line: ``commands`` (distill, eval), ``demo``, ``cli`` (arguments, ``main``).
Nothing is imported here, so ``import wam_fast.distill`` stays light.
"""
