"""AE-SAM, ESAM and BSAM in both training loops: each registry entry trains, every form pays
only its pass count (counted on the model / the loss, not taken from the loops' books), the
rho ramp reaches them, and JAX BSAM's calibration comes from its predictive."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sam_jax
import sam_torch
from examples import optimizers, train_jax, train_torch
from examples.calibration import expected_calibration_error
from examples.cli import RHO_WARMUP_OPTIMIZERS, make_config
from examples.data import batches, load_training_data
from tests.examples.conftest import count_jax_forward_passes

BATCH, N_TRAIN, STEPS = 32, 6 * 32, 6
K = 16  # ESAM's selected examples of a batch of 32 (gamma 0.5)
# AE-SAM: 16 steps, so that both kinds of step happen (its statistics warm up from 0, and
# the first steps are SAM steps)
AE = dict(batch_size=16, limit_train=256)
AE_STEPS = 16


def _config(optimizer, **extra):
    values = dict(
        dataset="digits", epochs=1, batch_size=BATCH, limit_train=N_TRAIN, limit_test=50,
        eval_batch_size=50, optimizer=optimizer, rho=0.05, threads=1, lr=0.05,
        label_smoothing=0.0,
    )
    return make_config(**{**values, **extra})




def test_registered_in_both_backends_with_the_ramp():
    for name in ("aesam", "esam", "bsam"):
        assert name in optimizers.TORCH_OPTIMIZERS and name in optimizers.OPTAX_OPTIMIZERS
    assert {"aesam", "esam"} <= set(RHO_WARMUP_OPTIMIZERS)
    assert "bsam" not in RHO_WARMUP_OPTIMIZERS


def _torch_counted(monkeypatch):
    """Patch the torch loop: count the backward passes (a hook on the first layer's weight)
    and the batch sizes of the forward passes; keep the optimizer."""
    backwards, forwards, kept = [], [], {}
    build, make = train_torch.build_model, train_torch.make_torch_optimizer

    def counted(config, data):
        model = build(config, data)
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))
        first.weight.register_hook(lambda grad: backwards.append(1))
        model.register_forward_hook(
            lambda mod, inputs, out: forwards.append(len(inputs[0])) if mod.training else None
        )
        return model

    def keep(name, model, args):
        kept["opt"] = make(name, model, args)
        return kept["opt"]

    monkeypatch.setattr(train_torch, "build_model", counted)
    monkeypatch.setattr(train_torch, "make_torch_optimizer", keep)
    return backwards, forwards, kept


def test_torch_aesam_pays_one_pass_on_its_plain_steps(monkeypatch):
    backwards, _, kept = _torch_counted(monkeypatch)
    (epoch,) = train_torch.train(_config("aesam", **AE))
    sam_steps = kept["opt"].sam_steps
    assert 0 < sam_steps < AE_STEPS  # both kinds of step happen in this run
    assert kept["opt"].total_steps == AE_STEPS  # the paper's schedule of c over the run
    assert len(backwards) == AE_STEPS + sam_steps
    assert epoch["passes"] == AE_STEPS + sam_steps
    assert epoch["passes_per_step"] == pytest.approx(1 + sam_steps / AE_STEPS)
    assert math.isfinite(epoch["sharpness"])


def test_jax_aesam_pays_one_pass_on_its_plain_steps_as_its_own_lax_cond_decides(
    monkeypatch, fresh_jax_steps
):
    """The loop's two steps chosen on the host run the perturbed pass on the rule's SAM
    steps only, and give the weights of sam_jax.ae_sam's own lax.cond in one jitted step."""
    import dataclasses

    config = _config("aesam", label_noise=0.4, **AE)
    with monkeypatch.context() as patch:
        calls = count_jax_forward_passes(patch, AE["batch_size"])
        host, host_state = train_jax.train_model(config)
        jax.effects_barrier()
    sam_steps = int(train_jax._first_state(host_state.opt_state).sam_count)
    assert 0 < sam_steps < AE_STEPS
    assert len(calls) == AE_STEPS + sam_steps  # forward passes the compiled steps ran
    assert host[0]["passes"] == AE_STEPS + sam_steps
    assert math.isclose(host[0]["passes_per_step"], 1 + sam_steps / AE_STEPS)
    train_jax.make_steps.cache_clear()
    entry = optimizers.OPTAX_OPTIMIZERS["aesam"]
    monkeypatch.setitem(
        optimizers.OPTAX_OPTIMIZERS, "aesam", dataclasses.replace(entry, decided_on_host=False)
    )
    cond, cond_state = train_jax.train_model(config)
    a, b = train_jax._first_state(host_state.opt_state), train_jax._first_state(cond_state.opt_state)
    assert int(a.count) == int(b.count) == AE_STEPS
    assert 0 < int(a.sam_count) == int(b.sam_count) < AE_STEPS  # the same decisions
    assert sum(h["passes"] for h in host) == AE_STEPS + int(a.sam_count)
    for ha, hb in zip(host, cond, strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4)
    for x, y in zip(jax.tree.leaves(host_state.params), jax.tree.leaves(cond_state.params),
                    strict=True):
        # differently compiled float32 programs: each leaf relative to its own scale
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(y)


def test_both_loops_agree_on_aesam(fresh_jax_steps):
    """Same data, initial weights and rule: the same SAM steps and the same losses up to
    float32 rounding of differently compiled programs."""
    config = _config("aesam", epochs=2, label_noise=0.4, **AE)
    a, b = train_torch.train(config), train_jax.train(config)
    assert a[0]["passes"] < 2 * AE_STEPS  # some plain steps
    for ha, hb in zip(a, b, strict=True):
        assert ha["passes"] == hb["passes"]  # the same decisions
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-3)
        assert ha["sharpness"] == pytest.approx(hb["sharpness"], rel=2e-2)


def test_torch_esam_passes_and_the_per_example_contract(monkeypatch):
    backwards, forwards, kept = _torch_counted(monkeypatch)
    (epoch,) = train_torch.train(_config("esam"))
    opt = kept["opt"]
    assert isinstance(opt, sam_torch.ESAM)
    assert (opt.beta, opt.gamma) == (optimizers.ESAM_BETA, optimizers.ESAM_GAMMA)
    # per step: the batch at w (with backward), at w + e (selection, no backward), its k
    # selected examples at w + e (with backward)
    assert forwards == [BATCH, BATCH, K] * STEPS
    assert len(backwards) == 2 * STEPS
    assert len(opt.selected) == K
    assert epoch["passes"] == pytest.approx(STEPS * (1 + K / BATCH))
    assert epoch["passes_per_step"] == pytest.approx(1 + K / BATCH)
    assert math.isfinite(epoch["sharpness"]) and math.isfinite(epoch["train_loss"])


def test_jax_esam_passes_and_the_per_example_contract(monkeypatch, fresh_jax_steps):
    sizes = []
    per_example = train_jax.per_example_cross_entropy

    def counted(logits, labels, smoothing):
        n = logits.shape[0]
        jax.debug.callback(lambda: sizes.append(n))
        return per_example(logits, labels, smoothing)

    monkeypatch.setattr(train_jax, "per_example_cross_entropy", counted)
    (epoch,), state = train_jax.train_model(_config("esam"))
    jax.effects_barrier()
    # per step: the clean losses (B), the selection's forward at w + e (B), the selected (k)
    assert sorted(sizes) == sorted([BATCH, BATCH, K] * STEPS)
    assert epoch["passes"] == pytest.approx(STEPS * (1 + K / BATCH))
    assert math.isfinite(epoch["sharpness"]) and math.isfinite(epoch["train_loss"])
    assert int(train_jax._first_state(state.opt_state).count) == STEPS


def test_torch_bsam_records_its_two_passes(monkeypatch):
    backwards, _, _ = _torch_counted(monkeypatch)
    (epoch,) = train_torch.train(_config("bsam"))
    assert len(backwards) == 2 * STEPS and epoch["passes"] == 2 * STEPS


def test_jax_bsam_trains_and_calibrates_with_its_predictive(monkeypatch, fresh_jax_steps):
    calls = count_jax_forward_passes(monkeypatch, BATCH)
    config = _config("bsam", seed=3)
    (epoch,), state = train_jax.train_model(config)
    jax.effects_barrier()
    assert len(calls) == 2 * STEPS and epoch["passes"] == 2 * STEPS
    bs = train_jax._first_state(state.opt_state)
    assert isinstance(bs, sam_jax.BSAMState) and int(bs.num_data) == N_TRAIN
    # the final ECE and accuracy: BSAM's predictive over the test split, 8 samples from
    # key(seed), recomputed here through the public API
    model = train_jax._model("digits", config.depth, config.width, 10)
    test = load_training_data(config).test

    def apply_fn(p, x):
        return model.apply({"params": p, "batch_stats": state.batch_stats}, x, train=False)

    probs = np.concatenate([
        np.asarray(sam_jax.predictive(apply_fn, state.params, state.opt_state, jnp.asarray(x),
                                      key=jax.random.key(3), samples=8), np.float64)
        for x, _ in batches(test, config.eval_batch_size, dataset="digits")
    ])
    ece = expected_calibration_error(probs, test.labels)
    assert math.isfinite(epoch["test_ece"]) and 0.0 <= epoch["test_ece"] <= 1.0
    assert epoch["test_ece"] == pytest.approx(ece, abs=1e-5)
    assert epoch["test_acc_calibrated"] == pytest.approx(float((probs.argmax(1) == test.labels).mean()))
    point = expected_calibration_error(
        np.asarray(jax.nn.softmax(apply_fn(state.params, jnp.asarray(test.images))), np.float64),
        test.labels,
    )
    assert abs(point - epoch["test_ece"]) > 1e-6  # not the posterior mean's softmax


@pytest.mark.parametrize("module", [train_torch, train_jax], ids=["torch", "jax"])
def test_rho_ramp_reaches_aesam_and_esam(module, fresh_jax_steps):
    """A ramp far longer than training keeps rho ~1e-10: AE-SAM then follows SGD's
    trajectory and ESAM measures no sharpness."""
    sgd = module.train(_config("sgd", seed=1))[0]
    ae = module.train(_config("aesam", rho=0.3, rho_warmup_epochs=1e9, seed=1))[0]
    assert ae["train_loss"] == pytest.approx(sgd["train_loss"], rel=1e-4)
    es = module.train(_config("esam", rho=0.3, rho_warmup_epochs=1e9, seed=1))[0]
    assert abs(es["sharpness"]) < 1e-4  # rho ~1e-10: L(w + e) = L(w) up to rounding


@pytest.mark.parametrize("module", [train_torch, train_jax], ids=["torch", "jax"])
@pytest.mark.parametrize("optimizer", ["aesam", "esam", "bsam"])
def test_m_sharpness_is_refused_for_the_whole_batch_forms(module, optimizer):
    with pytest.raises(ValueError, match=f"m_sharpness=8 is not supported with optimizer '{optimizer}'"):
        module.train(_config(optimizer, m_sharpness=8))


def test_esam_and_bsam_registry_entries_match_the_library_objects():
    """The optax entries against the chains written by hand (float64, a few steps), and the
    torch entries' classes and knobs."""
    from argparse import Namespace

    import optax

    from tests.helpers import jax_x64, max_rel_diff

    args = Namespace(lr=0.1, momentum=0.9, nesterov=False, rho=0.1, eta=0.01, schedule="step",
                     epochs=10, weight_decay=5e-4, seed=4, num_data=40)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    es = optimizers.make_torch_optimizer("esam", model, args)
    assert isinstance(es, sam_torch.ESAM) and (es.beta, es.gamma, es.mask) == (0.5, 0.5, "tensor")
    bs = optimizers.make_torch_optimizer("bsam", model, args)
    assert isinstance(bs, sam_torch.BSAM)
    with jax_x64():
        lr = optimizers.optax_schedule(args, 5)
        x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
        params = {"w": jnp.linspace(0.2, 1.4, 12).reshape(3, 4), "b": jnp.zeros(4)}

        def losses_of(p, index=None):
            xs = x if index is None else x[index]
            return jnp.sum(jnp.tanh(xs @ p["w"] + p["b"]) ** 2, axis=1)

        def mean_loss(p):
            return losses_of(p).mean()

        def run(tx, per_example):
            p, state = params, tx.init(params)
            for _ in range(4):
                value, grads = jax.value_and_grad(mean_loss)(p)
                if per_example:
                    updates, state = tx.update(grads, state, p, loss_fn=losses_of,
                                               losses=losses_of(p), value=value)
                else:
                    updates, state = tx.update(None, state, p,
                                               grad_fn=jax.value_and_grad(mean_loss))
                p = optax.apply_updates(p, updates)
            return jax.tree.leaves(p)

        esam_by_hand = optax.chain(
            sam_jax.esam(0.1, beta=0.5, gamma=0.5, seed=4, eta=0.01),
            optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9),
        )
        bsam_by_hand = sam_jax.bsam(num_data=40, lr=lr, betas=(0.9, 0.999), rho=0.1,
                                    weight_decay=5e-4, seed=4)
        got_e = run(optimizers.make_optax("esam", args, 5), True)
        got_b = run(optimizers.make_optax("bsam", args, 5), False)
        assert max_rel_diff(got_e, run(esam_by_hand, True)) < 1e-14
        assert max_rel_diff(got_b, run(bsam_by_hand, False)) < 1e-14
        assert max_rel_diff(got_e, jax.tree.leaves(params)) > 1e-3
        assert max_rel_diff(got_b, jax.tree.leaves(params)) > 1e-3
