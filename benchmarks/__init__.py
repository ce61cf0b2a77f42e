"""Benchmarks of atelier3d (not tests): run each from the repository root as a module, e.g.
``.venv/bin/python -m benchmarks.sam_clicks``, so ``benchmarks.common`` and the worktree's
``atelier3d`` are importable without touching ``sys.path``."""
