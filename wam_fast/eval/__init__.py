"""Closed-loop evaluation of world action models in simulation (the ``[sim]`` extra).

``wam_fast.eval.metaworld``: Meta-World MT1 tasks (``python -m wam_fast.eval.metaworld --help``).
Nothing here is imported by ``import wam_fast``; Meta-World is imported only when an environment is made.
"""
