"""The main job: sam-opt measured against its peers (``python benchmarks/compare.py`` or
``python -m benchmarks``).

One module per section of the report, each ``run(config, progress) -> dict``:
:mod:`~benchmarks.overhead`, :mod:`~benchmarks.step`, :mod:`~benchmarks.memory`,
:mod:`~benchmarks.agreement`, :mod:`~benchmarks.accuracy`, :mod:`~benchmarks.variants`; the
registry and the command line in :mod:`~benchmarks.compare`, the report and plots in
:mod:`~benchmarks.report`.
"""
