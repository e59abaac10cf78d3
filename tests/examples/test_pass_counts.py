"""Every form pays only its pass count in both training loops: the forward-backward passes
the loops actually run (counted on the model / the loss, not taken from the loops' own
books) are 2 per SAM step, 1 per SGD and Momentum-SAM step, 1 + 1/k for LookSAM and every-k
SAM, and equal the ``passes`` the loops record in their metrics."""

from __future__ import annotations

import math

import jax
import pytest
import torch

from examples import train_jax, train_torch
from examples.cli import make_config
from tests.examples.conftest import count_jax_forward_passes

BATCH, N_TRAIN = 32, 6 * 32  # six steps per epoch: LookSAM's full steps at 0 and 5
EXPECTED = {  # passes over the six steps of the epoch
    "sgd": 6,
    "sam": 12,
    "msam": 6,
    "looksam": 6 + 2,  # steps 0 and 5 (count % k == 0)
    "everyk": 6 + 1,  # step 4 ((count + 1) % k == 0)
    "gsam": 12,
}


def _config(optimizer, **extra):
    return make_config(
        dataset="digits", epochs=1, batch_size=BATCH, limit_train=N_TRAIN, limit_test=50,
        eval_batch_size=50, optimizer=optimizer, rho=0.05, threads=1, **extra,
    )



@pytest.mark.parametrize("optimizer", sorted(EXPECTED))
def test_torch_loop_runs_and_records_the_form_s_passes(optimizer, monkeypatch):
    backwards = []
    build = train_torch.build_model

    def counted(config, data):
        model = build(config, data)
        # one call per backward pass through the whole model (the loss's gradient reaches
        # the first layer's weight once per pass)
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))
        first.weight.register_hook(lambda grad: backwards.append(1))
        return model

    monkeypatch.setattr(train_torch, "build_model", counted)
    (epoch,) = train_torch.train(_config(optimizer))
    assert len(backwards) == EXPECTED[optimizer]
    assert epoch["passes"] == EXPECTED[optimizer]
    assert epoch["passes_per_step"] == pytest.approx(EXPECTED[optimizer] / 6)


def test_torch_looksam_pass_count_follows_k():
    (epoch,) = train_torch.train(_config("looksam", k=2))
    assert epoch["passes"] == 6 + 3  # full steps 0, 2, 4


@pytest.mark.parametrize("optimizer", ["sam", "msam", "looksam"])  # a compile each: the kinds
def test_jax_loop_runs_and_records_the_form_s_passes(optimizer, monkeypatch):
    # The loss is evaluated once per forward pass of the compiled step (a debug callback
    # runs each time the compiled program evaluates it); the evaluation's batches have 50
    # examples, the training's 32.
    calls = count_jax_forward_passes(monkeypatch, BATCH)
    train_jax.make_steps.cache_clear()
    try:
        (epoch,) = train_jax.train(_config(optimizer))
        jax.effects_barrier()
    finally:
        train_jax.make_steps.cache_clear()
    assert len(calls) == EXPECTED[optimizer]
    assert epoch["passes"] == EXPECTED[optimizer]
    assert math.isclose(epoch["passes_per_step"], EXPECTED[optimizer] / 6)
