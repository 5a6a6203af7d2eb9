"""``mole-bench`` (``python -m benchmarks``): the benchmark suite behind ``docs/benchmarks.md``.

One module per concern: :mod:`benchmarks.core` (load generator, percentiles, machine facts),
:mod:`benchmarks.env` (the shared context: assets, in-process workers, the process stack, the
original single-server baseline), one module per scenario, :mod:`benchmarks.report` (markdown and
plots) and :mod:`benchmarks.run` (the CLI entry point). Nothing here imports torch at import time.
"""
