"""torch and JAX compute the same m-sharpness steps: float64, weights converted across."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import sam_jax
import sam_torch
from examples import flax_train_steps as fts
from tests import helpers

LR, MOMENTUM, WD = 0.1, 0.9, 5e-3
B, M, STEPS = 16, 4, 3
CASES = [
    pytest.param(dict(rho=0.05, adaptive=False, eta=0.01), id="SAM"),
    pytest.param(dict(rho=0.5, adaptive=True, eta=0.01), id="ASAM"),
]


def _batches(kind, seed=1):
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        return [(rng.standard_normal((B, 5)), rng.standard_normal((B, 3))) for _ in range(STEPS)]
    return [(rng.standard_normal((B, 2, 6, 6)), rng.standard_normal((B, 3))) for _ in range(STEPS)]


def _torch_run(kind, sam_kw, vectorize):
    model = helpers.torch_mlp() if kind == "mlp" else helpers.torch_convnet()
    opt = sam_torch.SAM(
        model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, weight_decay=WD, **sam_kw
    )
    logs = []
    for x, t in _batches(kind):
        sam_torch.m_sharpness_step(
            opt, model, lambda mod, c: ((mod(c[0]) - c[1]) ** 2).mean(),
            (torch.from_numpy(x), torch.from_numpy(t)), m=M, vectorize=vectorize,
        )
        logs.append([float(opt.loss), float(opt.perturbed_loss), float(opt.grad_norm)])
    return [p.detach().numpy().copy() for p in model.parameters()], np.asarray(logs)


def _jax_run(kind, sam_kw, impl):
    if kind == "mlp":
        module = helpers.flax_mlp()
        variables = helpers.mlp_params_from_torch(helpers.torch_mlp())
        to_torch = helpers.mlp_params_to_torch_layout
    else:
        module = helpers.flax_convnet()
        variables = helpers.convnet_params_from_torch(helpers.torch_convnet())
        to_torch = helpers.convnet_params_to_torch_layout
    params = variables["params"]
    tx = optax.chain(
        sam_jax.sam(**sam_kw), optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM)
    )
    state = tx.init(params)

    def loss_fn(p, chunk):
        x, t = chunk
        return jnp.mean((module.apply({"params": p}, x) - t) ** 2)

    @jax.jit
    def step(params, state, batch):
        updates, state, _, _ = sam_jax.m_sharpness_update(
            tx, loss_fn, params, state, batch, m=M, impl=impl
        )
        return optax.apply_updates(params, updates), state

    logs = []
    for x, t in _batches(kind):
        if kind == "conv":
            x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        params, state = step(params, state, (jnp.asarray(x), jnp.asarray(t)))
        s = state[0]
        logs.append([float(s.value), float(s.perturbed_value), float(s.grad_norm)])
    return to_torch({"params": params}), np.asarray(logs)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("sam_kw", CASES)
def test_torch_and_jax_agree(sam_kw, kind):
    with helpers.jax_x64():
        runs = {f"jax {impl}": _jax_run(kind, sam_kw, impl) for impl in ("scan", "vmap")}
    for vectorize in (False, True):
        runs[f"torch vectorize={vectorize}"] = _torch_run(kind, sam_kw, vectorize)
    ref_params, ref_logs = runs["torch vectorize=False"]
    for name, (params, logs) in runs.items():
        assert helpers.max_rel_diff(params, ref_params) < 1e-11, name
        np.testing.assert_allclose(logs, ref_logs, rtol=1e-11, err_msg=name)


@pytest.mark.parametrize("impl", ["scan", "vmap"])
def test_nnx_recipe_equals_linen(impl):
    """The flax.nnx step of docs/m_sharpness.md gives the linen step's numbers."""
    from flax import nnx

    m = 8
    batch = fts.make_data(n=32)
    tx = fts.make_tx()
    state = fts.create_linen_state(tx=tx)

    def linen_loss(params, chunk):
        x, y = chunk
        logits, new = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats"],
        )
        return fts.cross_entropy(logits, y), new["batch_stats"]

    updates, _, linen_loss_value, stats = sam_jax.m_sharpness_update(
        tx, linen_loss, state.params, state.opt_state, batch, m=m, impl=impl, has_aux=True
    )
    linen_params = optax.apply_updates(state.params, updates)
    linen_stats = jax.tree.map(lambda s: s.mean(0), stats)

    model = fts.NNXMLP(rngs=nnx.Rngs(0))
    model.train()
    fts.copy_linen_to_nnx(state, model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Plain arrays: every nnx.merge inside the step builds fresh Variables at its own trace
    # level (the clean and perturbed passes mutate the BatchStats of their own copy).
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    opt_state = tx.init(params)

    @jax.jit
    def nnx_step(params, rest, opt_state, batch):
        def loss_fn(params, chunk):
            x, y = chunk
            model = nnx.merge(graphdef, params, rest)
            return fts.cross_entropy(model(x), y), nnx.state(model, nnx.BatchStat)

        updates, opt_state, loss, stats = sam_jax.m_sharpness_update(
            tx, loss_fn, params, opt_state, batch, m=m, impl=impl, has_aux=True
        )
        return optax.apply_updates(params, updates), jax.tree.map(lambda s: s.mean(0), stats), opt_state, loss

    new_params, new_stats, _, loss = nnx_step(params, rest, opt_state, batch)
    nnx.update(model, new_params, new_stats)
    np.testing.assert_allclose(float(loss), float(linen_loss_value), rtol=1e-6)
    p = linen_params
    pairs = [
        (model.fc1.kernel[...], p["Dense_0"]["kernel"]), (model.fc1.bias[...], p["Dense_0"]["bias"]),
        (model.bn.scale[...], p["BatchNorm_0"]["scale"]), (model.bn.bias[...], p["BatchNorm_0"]["bias"]),
        (model.fc2.kernel[...], p["Dense_1"]["kernel"]), (model.fc2.bias[...], p["Dense_1"]["bias"]),
        (model.bn.mean[...], linen_stats["BatchNorm_0"]["mean"]),
        (model.bn.var[...], linen_stats["BatchNorm_0"]["var"]),
    ]
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    # the statistics moved (from the clean passes), and not to the whole batch's
    assert not np.allclose(model.bn.mean[...], state.batch_stats["BatchNorm_0"]["mean"])


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM-ON", "ASAM-ON"])
def test_samon_torch_and_jax_agree(adaptive):
    """SAM-ON with the MLP's second layer as the mask, m = 4, both backends."""
    model = helpers.torch_mlp()
    opt = sam_torch.SAMON(
        model.parameters(), torch.optim.SGD, rho=0.3, adaptive=adaptive,
        norm_params=list(model[2].parameters()), lr=LR, momentum=MOMENTUM, weight_decay=WD,
    )
    for x, t in _batches("mlp"):
        sam_torch.m_sharpness_step(
            opt, model, lambda mod, c: ((mod(c[0]) - c[1]) ** 2).mean(),
            (torch.from_numpy(x), torch.from_numpy(t)), m=M, vectorize=False,
        )
    torch_params = [p.detach().numpy() for p in model.parameters()]
    with helpers.jax_x64():
        module = helpers.flax_mlp()
        params = helpers.mlp_params_from_torch(helpers.torch_mlp())["params"]
        mask = {"fc1": {"kernel": False, "bias": False}, "fc2": {"kernel": True, "bias": True}}
        tx = optax.chain(
            sam_jax.samon(0.3, mask=mask, adaptive=adaptive), optax.add_decayed_weights(WD),
            optax.sgd(LR, momentum=MOMENTUM),
        )
        state = tx.init(params)

        def loss_fn(p, chunk):
            return jnp.mean((module.apply({"params": p}, chunk[0]) - chunk[1]) ** 2)

        for x, t in _batches("mlp"):
            updates, state, _, _ = sam_jax.m_sharpness_update(
                tx, loss_fn, params, state, (jnp.asarray(x), jnp.asarray(t)), m=M
            )
            params = optax.apply_updates(params, updates)
        jax_params = helpers.mlp_params_to_torch_layout({"params": params})
    assert helpers.max_rel_diff(jax_params, torch_params) < 1e-11
    assert float(opt.grad_norm) == pytest.approx(float(state[0].grad_norm), rel=1e-11)
