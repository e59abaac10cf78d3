"""The Flax WideResNet equals the PyTorch one: converted weights give the same logits,
gradients, BatchNorm statistics and optimizer steps (float64)."""

from __future__ import annotations

import copy
import functools
from argparse import Namespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from examples.convert import torch_to_flax
from examples.optimizers import make_optax, make_torch_optimizer
from examples.train_jax import smoothed_cross_entropy
from examples.wrn_flax import WideResNet as FlaxWRN
from examples.wrn_torch import WideResNet as TorchWRN
from tests.helpers import conv_jit, jax_x64

DEPTH, WIDTH, CLASSES = 10, 2, 10


@pytest.fixture(scope="module")
def torch_model() -> TorchWRN:
    torch.manual_seed(0)
    model = TorchWRN(DEPTH, WIDTH, CLASSES).double()
    # Non-trivial BatchNorm parameters and statistics, so that conversion mistakes show.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 1 + 0.2 * torch.randn(
                m.weight.shape, generator=gen, dtype=torch.float64
            )
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=gen, dtype=torch.float64)
            m.running_mean = 0.1 * torch.randn(
                m.running_mean.shape, generator=gen, dtype=torch.float64
            )
            m.running_var = 1 + torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64)
    return model


def _inputs(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 32, 32, 3)), rng.integers(0, CLASSES, n)


def _grads_as_flax(model: torch.nn.Module) -> dict:
    holder = copy.deepcopy(model)
    for p, q in zip(holder.parameters(), model.parameters(), strict=True):
        p.data = q.grad.detach().clone()
    return torch_to_flax(holder, np.float64)["params"]


def _assert_trees_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


def _assert_flax_matches_torch(flax_model, variables, x, y, smoothing, train, model, logits_t):
    """Flax logits and gradients (float64) of ``variables`` equal torch's ``logits_t`` and
    the gradients already in ``model`` (backward done with the same loss)."""
    with jax_x64():

        def loss_fn(params):
            out = flax_model.apply(
                {**variables, "params": params},
                jnp.asarray(x),
                train=train,
                mutable=["batch_stats"] if train else False,
            )
            logits = out[0] if train else out
            return smoothed_cross_entropy(logits, jnp.asarray(y), smoothing), logits

        (_, logits_f), grads_f = conv_jit(jax.value_and_grad(loss_fn, has_aux=True))(
            variables["params"]
        )
        assert logits_f.dtype == jnp.float64
        np.testing.assert_allclose(
            np.asarray(logits_f), logits_t.detach().numpy(), rtol=1e-10, atol=1e-12
        )
        _assert_trees_close(grads_f, _grads_as_flax(model), rtol=1e-8, atol=1e-12)
    # The logits are not trivially equal: they depend on the input and mode.
    assert np.ptp(logits_t.detach().numpy()) > 0.1


@pytest.mark.parametrize("train", [False, True])
def test_converted_weights_give_same_logits_and_gradients(torch_model, train):
    model = copy.deepcopy(torch_model).train(train)
    x, y = _inputs()
    xt = torch.tensor(x.transpose(0, 3, 1, 2))
    logits_t = model(xt)
    F.cross_entropy(logits_t, torch.tensor(y), label_smoothing=0.1).backward()
    variables = torch_to_flax(torch_model, np.float64)
    flax_model = FlaxWRN(DEPTH, WIDTH, CLASSES)
    _assert_flax_matches_torch(flax_model, variables, x, y, 0.1, train, model, logits_t)


def test_train_mode_batchnorm_statistics_follow_momentum_convention(torch_model):
    """Flax momentum 0.9 == torch momentum 0.1; the running mean matches exactly and the
    running variance differs only by torch's unbiased factor n / (n - 1)."""
    model = copy.deepcopy(torch_model).train()
    variables = torch_to_flax(torch_model, np.float64)
    x, _ = _inputs(n=5, seed=3)
    model(torch.tensor(x.transpose(0, 3, 1, 2)))
    new_t = torch_to_flax(model, np.float64)["batch_stats"]
    with jax_x64():
        apply = conv_jit(
            functools.partial(FlaxWRN(DEPTH, WIDTH, CLASSES).apply, train=True),
            static_argnames="mutable",
        )
        _, new_vars = apply(variables, jnp.asarray(x), mutable=("batch_stats",))
    old, new_f = variables["batch_stats"], jax.tree.map(np.asarray, new_vars["batch_stats"])
    for (path, mean_t), mean_f, mean_old in zip(
        jax.tree.leaves_with_path(jax.tree.map(lambda s: s["mean"], new_t, is_leaf=_is_bn)),
        jax.tree.leaves(jax.tree.map(lambda s: s["mean"], new_f, is_leaf=_is_bn)),
        jax.tree.leaves(jax.tree.map(lambda s: s["mean"], old, is_leaf=_is_bn)),
        strict=True,
    ):
        np.testing.assert_allclose(mean_f, mean_t, rtol=1e-10, atol=1e-13, err_msg=str(path))
        assert np.max(np.abs(mean_t - mean_old)) > 1e-4  # the statistics did move
    # Variance: values per channel n = batch x height x width of the normalized activation.
    for layer, n in ((("block_0", "bn1"), 5 * 32 * 32), (("bn",), 5 * 8 * 8)):
        stats_t, stats_f, stats_old = new_t, new_f, old
        for key in layer:
            stats_t, stats_f, stats_old = stats_t[key], stats_f[key], stats_old[key]
        batch_var_t = (stats_t["var"] - 0.9 * stats_old["var"]) / 0.1  # unbiased
        batch_var_f = (stats_f["var"] - 0.9 * stats_old["var"]) / 0.1  # biased
        np.testing.assert_allclose(batch_var_t, batch_var_f * n / (n - 1), rtol=1e-9)
        assert not np.allclose(batch_var_t, batch_var_f, rtol=1e-4)


def _is_bn(node) -> bool:
    return isinstance(node, dict) and "mean" in node


def test_initialization_scheme_matches(torch_model):
    """Kaiming normal fan_out for convolutions in both backends: std sqrt(2 / fan_out)."""
    torch.manual_seed(1)
    fresh_t = torch_to_flax(TorchWRN(DEPTH, WIDTH, CLASSES), np.float64)["params"]
    init = jax.jit(FlaxWRN(DEPTH, WIDTH, CLASSES).init)
    fresh_f = init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
    assert jax.tree.structure(fresh_t) == jax.tree.structure(fresh_f)
    for name, fan_in in (("conv1", 64), ("conv2", 128)):
        kt, kf = fresh_t["block_2"][name]["kernel"], np.asarray(fresh_f["block_2"][name]["kernel"])
        assert kt.shape == kf.shape == (3, 3, fan_in, 128)
        expected = np.sqrt(2.0 / (128 * 9))  # fan_out = out_channels * kernel area
        for kernel in (kt, kf):
            assert abs(kernel.std() / expected - 1) < 0.015  # ~7 standard errors
            assert abs(kernel.mean()) < 0.015 * expected
    for tree in (fresh_t, fresh_f):
        np.testing.assert_array_equal(np.asarray(tree["fc"]["bias"]), 0.0)
        np.testing.assert_array_equal(np.asarray(tree["bn"]["scale"]), 1.0)


@functools.cache
def _flax_value_and_grad():
    """Jitted loss and gradient of the Flax model in train mode (compiled once per module)."""
    flax_model = FlaxWRN(DEPTH, WIDTH, CLASSES)

    def loss_fn(params, batch_stats, x, y):
        logits, _ = flax_model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return smoothed_cross_entropy(logits, y, 0.1)

    return conv_jit(jax.value_and_grad(loss_fn))


@pytest.mark.parametrize("name", ["sgd", "sam", "asam"])
def test_one_training_step_is_the_same_in_both_backends(torch_model, name):
    """The optimizer factories agree: one step from converted weights, same batch."""
    args = Namespace(
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        nesterov=False,
        rho=0.05,
        eta=0.01,
        schedule="step",
        epochs=10,
    )
    model = copy.deepcopy(torch_model).train()
    variables = torch_to_flax(torch_model, np.float64)
    x, y = _inputs(n=4, seed=5)
    xt, yt = torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(y)
    opt = make_torch_optimizer(name, model, args)
    for _ in range(2):  # two steps, so momentum matters
        F.cross_entropy(model(xt), yt, label_smoothing=0.1).backward()
        if hasattr(opt, "first_step"):
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(xt), yt, label_smoothing=0.1).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()
            opt.zero_grad()
    with jax_x64():
        value_and_grad = _flax_value_and_grad()
        xj, yj = jnp.asarray(x), jnp.asarray(y)

        def grad_fn(params):
            return value_and_grad(params, variables["batch_stats"], xj, yj)

        tx = make_optax(name, args, steps_per_epoch=5)
        params = jax.tree.map(jnp.asarray, variables["params"])
        state = tx.init(params)
        for _ in range(2):
            loss, grads = grad_fn(params)
            extra = {"grad_fn": grad_fn, "value": loss} if name != "sgd" else {}
            updates, state = tx.update(grads, state, params, **extra)
            params = optax.apply_updates(params, updates)
        expected = torch_to_flax(model, np.float64)["params"]
        # Two steps at lr 0.1 amplify float64 rounding to ~1e-10; weight decay alone moves
        # the weights by lr * wd * |w| ~ 1e-6, so a coupling mistake would show.
        _assert_trees_close(params, expected, rtol=1e-7, atol=1e-9)
        moved = jax.tree.map(
            lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), params, variables["params"]
        )
        assert max(jax.tree.leaves(moved)) > 1e-3


# ---------------------------------------------------------------------------------------
# The digits CNN
# ---------------------------------------------------------------------------------------


def test_small_cnn_starts_from_the_same_weights_in_both_backends():
    from examples.cnn_flax import init_variables
    from examples.cnn_init import init_small_cnn
    from examples.cnn_torch import SmallCNN

    for seed in (0, 7):
        converted = torch_to_flax(SmallCNN(seed))
        own = jax.tree.map(np.asarray, init_variables(seed))
        assert jax.tree.structure(converted) == jax.tree.structure(own)
        for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(own), strict=True):
            np.testing.assert_array_equal(a, b)  # the same float32 draws
    # PyTorch's default scheme: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    w = init_small_cnn(0)
    for name, fan_in in (("conv1.weight", 9), ("conv2.weight", 288), ("fc1.weight", 1024),
                         ("fc1.bias", 1024), ("fc2.weight", 128)):
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(w[name]).max() <= bound
        assert np.abs(w[name]).max() > 0.9 * bound  # the whole range is used
    assert not np.array_equal(init_small_cnn(0)["fc1.weight"], init_small_cnn(1)["fc1.weight"])


@pytest.mark.parametrize("train", [False, True])
def test_small_cnn_converted_weights_give_same_logits_and_gradients(train):
    from examples.cnn_flax import SmallCNN as FlaxCNN
    from examples.cnn_torch import SmallCNN as TorchCNN

    model = TorchCNN(seed=3).double()
    gen = torch.Generator().manual_seed(2)
    for m in model.modules():  # non-trivial BatchNorm state, so mistakes show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 1 + 0.2 * torch.randn(m.weight.shape, generator=gen, dtype=torch.float64)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=gen, dtype=torch.float64)
            m.running_mean = 0.1 * torch.randn(m.running_mean.shape, generator=gen,
                                               dtype=torch.float64)
            m.running_var = 1 + torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64)
    variables = torch_to_flax(model, np.float64)
    model.train(train)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 8, 8, 1)), rng.integers(0, 10, 6)
    logits_t = model(torch.tensor(x.transpose(0, 3, 1, 2)))
    F.cross_entropy(logits_t, torch.tensor(y)).backward()
    _assert_flax_matches_torch(FlaxCNN(10), variables, x, y, 0.0, train, model, logits_t)
