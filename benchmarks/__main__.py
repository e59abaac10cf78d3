"""``python -m benchmarks``: the main job, with the flags of ``benchmarks/compare.py``."""

from benchmarks.compare import _STARTED, main

main(started=_STARTED)
