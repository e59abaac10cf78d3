"""benchmarks.family_extra_cost: every row of both backends' tables, timed, with the pass
counts each form documents (a tiny network, one step, one block: no timing is asserted)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import family_extra_cost as bench

# one convolution in JAX (compile time; the rows' logic does not depend on the depth)
ARGS = argparse.Namespace(width=4, batch=4, size=8, steps=1, repeats=1, threads=1, layers=1)
#: forward-backward passes (in batches) and gradient-free forwards per step
EXPECTED = {
    "SGD": (1.0, 0.0),
    "SAM": (2.0, 0.0),
    "GCSAM": (2.0, 0.0),
    "official ASAM": (2.0, 0.0),
    "BSAM": (2.0, 0.0),
    # ESAM: the batch at w, a forward at w + e, the floor(gamma B) selected examples at w + e
    "ESAM": (1.0 + int(bench.ESAM_GAMMA * ARGS.batch) / ARGS.batch, 1.0),
}


@pytest.fixture(scope="module", params=["torch", "jax"])
def results(request):
    backend = request.param
    return backend, (bench.torch_results if backend == "torch" else bench.jax_results)(ARGS)


def test_every_row_is_timed_with_its_documented_passes(results):
    backend, rows = results
    assert list(rows) == list(bench.rows()), backend
    for name, (seconds, passes, forwards) in rows.items():
        assert seconds > 0, name
        if name == "AE-SAM":  # 1 + the fraction of SAM steps, data dependent
            assert 1.0 <= passes <= 2.0 and forwards == 0.0
        else:
            assert (passes, forwards) == pytest.approx(EXPECTED[name]), (backend, name)


def test_the_table_is_markdown_with_a_row_per_form_and_sgd_at_one(results):
    backend, rows = results
    text = bench.table({backend: rows})
    lines = text.splitlines()
    assert lines[1].startswith("|---|")
    assert len(lines) == 2 + len(bench.rows())
    sgd = next(line for line in lines if line.startswith("| SGD |"))
    assert sgd.rstrip(" |").endswith("1.00")
    esam = next(line for line in lines if line.startswith("| ESAM |"))
    assert "+ 1.00 fwd" in esam
