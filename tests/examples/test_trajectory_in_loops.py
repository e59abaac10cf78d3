"""SAF and MESA in both training loops and the label-noise study: each registry entry
trains with the library's defaults, the term starts after ``start_epoch``, the passes and
forwards are those documented (counted on the model, not taken from the loops' books),
torch and JAX give the same trajectory loss, and the study treats them as rho-free like
SGD."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sam_core
import sam_jax
import sam_torch
from benchmarks import label_noise as study
from examples import optimizers, train_jax, train_torch
from examples.cli import FORM_OPTIONS, RHO_WARMUP_OPTIMIZERS, make_config
from examples.trajectory import (
    jax_trajectory_term,
    jax_update_kwargs,
    make_optax_trajectory,
    make_torch_trajectory,
    torch_trajectory_term,
)

BATCH, N_TRAIN, STEPS = 32, 6 * 32, 6
# the term on from zero-based epoch 1 (start_epoch < epoch); SAF reads epoch 0's outputs
EARLY = {"saf": dict(saf_start_epoch=0, saf_lag_epochs=1),
         "mesa": dict(mesa_start_epoch=0, mesa_decay=0.5)}


def _config(optimizer, **extra):
    values = dict(
        dataset="digits", epochs=2, batch_size=BATCH, limit_train=N_TRAIN, limit_test=50,
        eval_batch_size=50, optimizer=optimizer, threads=1, lr=0.05, label_smoothing=0.0,
    )
    return make_config(**{**values, **EARLY.get(optimizer, {}), **extra})




def test_registered_with_the_library_defaults_and_no_rho():
    from argparse import Namespace

    for name in ("saf", "mesa"):
        assert name in optimizers.TORCH_OPTIMIZERS and name in optimizers.OPTAX_OPTIMIZERS
        assert optimizers.OPTAX_OPTIMIZERS[name].trajectory
        assert name not in RHO_WARMUP_OPTIMIZERS
    for key, value in sam_core.SAF_DEFAULTS.items():
        assert FORM_OPTIONS[f"saf_{key}"] == {"saf": value}
    for key, value in sam_core.MESA_DEFAULTS.items():
        assert FORM_OPTIONS[f"mesa_{key}"] == {"mesa": value}
    args = Namespace(lr=0.1, momentum=0.9, nesterov=False, rho=0.05, eta=0.01, schedule="step",
                     epochs=10, weight_decay=5e-4, seed=0, num_data=40, num_classes=3)
    model = torch.nn.Linear(4, 3)
    saf = optimizers.make_torch_optimizer("saf", model, args)
    mesa = optimizers.make_torch_optimizer("mesa", model, args)
    assert isinstance(saf, sam_torch.SAF) and isinstance(mesa, sam_torch.MESA)
    assert (saf.lmbda, saf.temperature, saf.start_epoch, saf.lag_epochs) == (0.3, 5.0, 5, 3)
    assert (mesa.lmbda, mesa.temperature, mesa.start_epoch, mesa.decay) == (0.8, 5.0, 5, 0.9998)
    params = {"w": jnp.zeros((4, 3))}
    s = optimizers.make_optax("saf", args, 5).init(params)
    m = optimizers.make_optax("mesa", args, 5).init(params)
    assert isinstance(s, sam_jax.SAFState) and isinstance(m, sam_jax.MESAState)
    assert s.memory.shape == (3, 40, 3)  # lag_epochs slots of num_data x num_classes
    assert (float(s.lmbda), int(s.start_epoch)) == (pytest.approx(0.3), 5)
    assert (float(m.lmbda), int(m.start_epoch)) == (pytest.approx(0.8), 5)


def test_knobs_are_refused_for_other_forms():
    with pytest.raises(SystemExit, match="--saf-start-epoch applies to --optimizer saf"):
        make_config(optimizer="sgd", saf_start_epoch=0)
    with pytest.raises(SystemExit, match="--mesa-decay applies to --optimizer mesa"):
        make_config(optimizer="saf", mesa_decay=0.5)


@pytest.mark.parametrize("module", [train_torch, train_jax], ids=["torch", "jax"])
@pytest.mark.parametrize("optimizer", ["saf", "mesa"])
def test_m_sharpness_is_refused(module, optimizer):
    with pytest.raises(ValueError, match=f"m_sharpness=8 is not supported with optimizer '{optimizer}'"):
        module.train(_config(optimizer, m_sharpness=8))


@pytest.mark.parametrize("optimizer", ["saf", "mesa"])
def test_torch_passes_and_the_term(monkeypatch, optimizer):
    """Per step one forward-backward in train mode; MESA's EMA forward (eval mode, a batch
    of the training set's size) only on the epoch with the term."""
    backwards, forwards = [], []
    build = train_torch.build_model

    def counted(config, data):
        model = build(config, data)
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))
        first.weight.register_hook(lambda grad: backwards.append(1))
        model.register_forward_hook(
            lambda mod, inputs, out: forwards.append((mod.training, len(inputs[0])))
        )
        return model

    monkeypatch.setattr(train_torch, "build_model", counted)
    history = train_torch.train(_config(optimizer))
    assert len(backwards) == 2 * STEPS
    assert forwards.count((True, BATCH)) == 2 * STEPS
    ema = STEPS if optimizer == "mesa" else 0
    assert forwards.count((False, BATCH)) == ema  # evaluation runs batches of 50
    assert [h["passes"] for h in history] == [STEPS, STEPS]
    assert [h["passes_per_step"] for h in history] == [1.0, 1.0]
    assert [h["forwards_per_step"] for h in history] == [0.0, ema / STEPS]
    assert history[0]["trajectory_loss"] == 0.0  # off at epoch 0 (start_epoch 0 < epoch)
    assert history[1]["trajectory_loss"] > 1e-4
    assert history[0]["sharpness"] is None
    assert all(math.isfinite(h["train_loss"]) for h in history)


@pytest.mark.parametrize("optimizer", ["saf", "mesa"])
def test_jax_passes_and_the_term(monkeypatch, fresh_jax_steps, optimizer):
    """One clean pass per step; MESA's EMA forward compiled into the step of the epochs with
    the term only (the host picks the compiled step)."""
    clean, ema_calls = [], []
    loss = train_jax.smoothed_cross_entropy

    def counted_loss(logits, labels, smoothing):
        if logits.shape[0] == BATCH:
            jax.debug.callback(lambda: clean.append(1))
        return loss(logits, labels, smoothing)

    def counted_term(state, logits, apply_fn, indices, epoch):
        def counted_apply(p):
            out = apply_fn(p)
            jax.debug.callback(lambda: ema_calls.append(1))
            return out

        return jax_trajectory_term(state, logits, counted_apply, indices, epoch)

    monkeypatch.setattr(train_jax, "smoothed_cross_entropy", counted_loss)
    monkeypatch.setattr(train_jax, "jax_trajectory_term", counted_term)
    history, state = train_jax.train_model(_config(optimizer))
    jax.effects_barrier()
    ema = STEPS if optimizer == "mesa" else 0
    assert len(clean) == 2 * STEPS and len(ema_calls) == ema
    assert [h["passes"] for h in history] == [STEPS, STEPS]
    assert [h["forwards_per_step"] for h in history] == [0.0, ema / STEPS]
    assert history[0]["trajectory_loss"] == 0.0 and history[1]["trajectory_loss"] > 1e-4
    assert int(state.opt_state.start_epoch) == 0


@pytest.mark.parametrize("optimizer", ["saf", "mesa"])
def test_both_loops_agree(fresh_jax_steps, optimizer):
    """Same data, initial weights, indices and rule: the same losses and trajectory terms up
    to float32 rounding of differently compiled programs."""
    config = _config(optimizer, label_noise=0.4)
    a, b = train_torch.train(config), train_jax.train(config)
    for ha, hb in zip(a, b, strict=True):
        assert ha["passes"] == hb["passes"] and ha["forwards_per_step"] == hb["forwards_per_step"]
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-3)
    assert a[0]["trajectory_loss"] == b[0]["trajectory_loss"] == 0.0
    assert a[1]["trajectory_loss"] == pytest.approx(b[1]["trajectory_loss"], rel=5e-3)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_first_active_step_torch_equals_jax_in_float64(name):
    """The loops' calls (examples.trajectory) on a float64 linear model in both backends:
    the same trajectory loss on the first step with the term, and the same weights after.
    JAX SAF's memory is float32 by default (``memory_dtype``), torch's follows the logits:
    here both float64, through ``sam_jax.saf`` around the helper's chain."""
    from types import SimpleNamespace

    import optax

    from tests.helpers import jax_x64

    args = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False,
                           saf_start_epoch=0, saf_lag_epochs=1, mesa_start_epoch=0,
                           mesa_decay=0.5)
    rng = np.random.default_rng(3)
    x_np, y_np = rng.normal(size=(8, 5)), rng.integers(0, 3, 8)
    batches_idx = [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])]
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    w0, b0 = model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()
    opt = make_torch_trajectory(name, model, args, num_examples=8)
    torch_terms = []
    for epoch in range(2):
        for idx in batches_idx:
            xt, yt = torch.from_numpy(x_np[idx]), torch.from_numpy(y_np[idx])
            logits = model(xt)
            term = torch_trajectory_term(opt, model, logits, xt, idx, epoch)
            torch_terms.append(float(term.detach()))
            (torch.nn.functional.cross_entropy(logits, yt) + term).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    with jax_x64():
        tx = make_optax_trajectory(name, args, lambda count: 0.1, num_examples=8, num_classes=3)
        if name == "saf":
            base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
            tx = sam_jax.saf(base, num_examples=8, num_classes=3, start_epoch=0, lag_epochs=1,
                             memory_dtype=jnp.float64)
        params = {"w": jnp.asarray(w0.T), "b": jnp.asarray(b0)}
        state = tx.init(params)
        jax_terms = []
        for epoch in range(2):
            for idx in batches_idx:
                x, y, ix = jnp.asarray(x_np[idx]), jnp.asarray(y_np[idx]), jnp.asarray(idx)

                def loss_fn(p, x=x, y=y, ix=ix, epoch=epoch, state=state):
                    logits = x @ p["w"] + p["b"]
                    term = jax_trajectory_term(
                        state, logits, lambda q: x @ q["w"] + q["b"], ix, epoch
                    )
                    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                    return ce + term, (logits, term)

                (_, (logits, term)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
                updates, state = tx.update(
                    g, state, params, **jax_update_kwargs(state, logits, ix, epoch)
                )
                params = optax.apply_updates(params, updates)
                jax_terms.append(float(term))
        w, b = np.asarray(params["w"]).T, np.asarray(params["b"])
    assert torch_terms[:2] == [0.0, 0.0] and jax_terms[:2] == [0.0, 0.0]
    assert torch_terms[2] > 1e-6  # the first step with the term
    np.testing.assert_allclose(jax_terms, torch_terms, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(w, model.weight.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b, model.bias.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_study_plans_them_like_sgd_for_rho():
    settings = study.DATASET_SETTINGS["digits"]
    opts = [study.parse_optimizer(n) for n in ("sgd", "saf", "mesa", "sam")]
    runs = study.plan_runs(settings, opts, [0], ["torch"], noise_levels=[0.4])
    by_name = {r.optimizer.name: r for r in runs}
    assert settings["config"].get("rho_warmup_epochs")  # the digits ramp SAM-family forms
    for name in ("sgd", "saf", "mesa"):
        run = by_name[name]
        assert run.rho == 0.0
        values = run.overrides()
        assert "rho_warmup_epochs" not in values and values["rho"] == 0.0
        # a rho in a record means nothing: it neither splits nor mislabels the runs
        record = {"dataset": "digits", "backend": "torch", "optimizer": name,
                  "m_sharpness": None, "seed": 0, "label_noise": 0.4, "epochs": 40,
                  "n_train": None, "rho": 0.0, "rho_warmup_epochs": 0.0}
        assert study.run_key(record) == study.run_key({**record, "rho": 0.2,
                                                       "rho_warmup_epochs": 5.0})
        assert study._rho_text(record) == "–"
    assert by_name["sam"].rho > 0.0 and "rho_warmup_epochs" in by_name["sam"].overrides()
    names = {n: study.OptimizerSpec(n).display for n in ("saf", "mesa", "aesam", "esam")}
    assert names == {"saf": "SAF", "mesa": "MESA", "aesam": "AE-SAM", "esam": "ESAM"}
    for text in ("saf/m16", "mesa/m16"):
        with pytest.raises(ValueError, match="m-sharpness needs a SAM-family optimizer"):
            study.parse_optimizer(text)
    # --set saf_start_epoch=0: SAF's own knob, recorded in its key; dropped for the others
    early = study.plan_runs(settings, opts, [0], ["torch"], noise_levels=[0.4],
                            overrides={"saf_start_epoch": 0})
    early_by = {r.optimizer.name: r for r in early}
    assert early_by["saf"].overrides()["saf_start_epoch"] == 0
    assert "saf_start_epoch" not in early_by["mesa"].overrides()
    assert early_by["saf"].key() != by_name["saf"].key()
    assert early_by["mesa"].key() == by_name["mesa"].key()
