"""The examples' ``--optimizer`` registry builds every SAM-family variant in both backends,
and the two give the same WideResNet steps (float64, converted weights, BatchNorm)."""

from __future__ import annotations

import copy
from argparse import Namespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from examples.convert import torch_to_flax  # noqa: E402
from examples.optimizers import (  # noqa: E402
    OPTAX_OPTIMIZERS,
    TORCH_OPTIMIZERS,
    make_optax,
    make_torch_optimizer,
    optax_schedule,
)
from examples.wrn_flax import WideResNet as FlaxWRN  # noqa: E402
from examples.wrn_torch import WideResNet as TorchWRN  # noqa: E402
from tests.helpers import conv_jit, jax_x64, max_rel_diff  # noqa: E402

VARIANTS = ("gsam", "samon", "looksam", "everyk", "msam", "fsam", "wsam", "vasso", "aesam")
DEPTH, WIDTH, CLASSES = 10, 1, 10


def test_every_variant_is_registered_in_both_backends():
    assert set(VARIANTS) <= set(TORCH_OPTIMIZERS)
    assert set(VARIANTS) <= set(OPTAX_OPTIMIZERS)
    assert all(OPTAX_OPTIMIZERS[name].needs_grad_fn for name in VARIANTS)


# total_steps: AE-SAM's schedule of c (the loops set it to the run's steps)
ARGS = dict(lr=0.1, momentum=0.9, nesterov=False, rho=0.1, eta=0.01, schedule="step", epochs=10,
            total_steps=50)
TORCH_EXPECTED = {
    "gsam": ("GSAM", {"alpha": 0.2}),
    "samon": ("SAMON", {}),
    "looksam": ("LookSAM", {"k": 5, "alpha": 0.7}),
    "everyk": ("EveryKSAM", {"k": 5}),
    "msam": ("MomentumSAM", {}),
    "fsam": ("FriendlySAM", {"sigma": 1.0, "lmbda": 0.9}),
    "wsam": ("WSAM", {"gamma": 0.88, "decouple": True}),
    "vasso": ("VaSSO", {"theta": 0.9}),
    "aesam": ("AESAM", {"delta": 0.9, "c_start": 1.0, "c_end": -1.0, "total_steps": 50}),
}


def _by_hand(name, args):
    """The optax chain each registry entry should build, written out."""
    import sam_jax

    lr = optax_schedule(args, 5)  # the examples' schedule (its float32 arithmetic included)

    def base():
        return [optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9)]

    first = {
        "gsam": lambda: sam_jax.gsam(0.1, alpha=0.2),
        "looksam": lambda: sam_jax.looksam(0.1, k=5, alpha=0.7),
        "everyk": lambda: sam_jax.every_k_sam(0.1, k=5),
        "msam": lambda: sam_jax.momentum_sam(0.1, momentum=0.9),
        "fsam": lambda: sam_jax.friendly_sam(0.1, sigma=1.0, lmbda=0.9),
        "vasso": lambda: sam_jax.vasso(0.1, theta=0.9),
        "aesam": lambda: sam_jax.ae_sam(0.1, total_steps=50),
        "samon": lambda: sam_jax.samon(0.1, mask={"bn1": {"scale": True}, "fc": {"w": False}}),
    }
    if name == "wsam":
        return optax.chain(
            sam_jax.wsam(0.1, gamma=0.88, base=optax.chain(*base()), learning_rate=lr)
        )
    return optax.chain(first[name](), *base())


@pytest.mark.parametrize("name", VARIANTS)
def test_registry_entries_match_the_library_objects(name):
    # Fast wiring check of every entry: the torch class and its hyperparameters, and the
    # optax update against the chain written by hand, six steps on a tiny float64 problem.
    args = Namespace(weight_decay=5e-4, **ARGS)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = make_torch_optimizer(name, model, args)
    cls_name, hyper = TORCH_EXPECTED[name]
    assert type(opt).__name__ == cls_name
    assert {k: getattr(opt, k) for k in hyper} == hyper
    assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[0]["lr"] == 0.1
    with jax_x64():
        params = {"bn1": {"scale": jnp.linspace(0.5, 1.5, 4)}, "fc": {"w": jnp.ones((3, 4))}}

        def loss(p):
            return jnp.sum(jnp.tanh(p["fc"]["w"] @ p["bn1"]["scale"]) ** 2)

        grad_fn = jax.value_and_grad(loss)
        results = []
        for tx in (make_optax(name, args, steps_per_epoch=5), _by_hand(name, args)):

            @jax.jit
            def step(p, state, tx=tx):
                value, grads = grad_fn(p)
                updates, state = tx.update(grads, state, p, grad_fn=grad_fn, value=value)
                return optax.apply_updates(p, updates), state

            p, state = params, tx.init(params)
            for _ in range(6):
                p, state = step(p, state)
            results.append(jax.tree.leaves(p))
    assert max_rel_diff(results[0], results[1]) < 1e-14
    assert max_rel_diff(results[0], jax.tree.leaves(params)) > 1e-3


@pytest.mark.parametrize("name", ["samon", "wsam", "looksam"])
def test_registry_steps_agree_across_backends(name):
    # The WideResNet with BatchNorm in both backends, for the entries whose wiring differs
    # most between them: SAM-ON's masks, decoupled WSAM's wrapper, LookSAM's reuse step.
    args = Namespace(weight_decay=5e-4, **ARGS)
    steps = 2
    torch.manual_seed(0)
    model = TorchWRN(DEPTH, WIDTH, CLASSES).double().train()
    variables = torch_to_flax(model, np.float64)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 32, 32, 3)), rng.integers(0, CLASSES, 4)
    xt, yt = torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(y)

    opt = make_torch_optimizer(name, model, args)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(xt), yt)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    expected = torch_to_flax(model, np.float64)["params"]

    net = FlaxWRN(DEPTH, WIDTH, CLASSES)
    with jax_x64():
        stats = jax.tree.map(jnp.asarray, variables["batch_stats"])

        def loss_fn(params):
            logits, _ = net.apply(
                {"params": params, "batch_stats": stats},
                jnp.asarray(x),
                train=True,
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

        tx = make_optax(name, args, steps_per_epoch=5)
        params = jax.tree.map(jnp.asarray, variables["params"])
        state = tx.init(params)
        grad_fn = jax.value_and_grad(loss_fn)

        @conv_jit  # float64 convolutions: XLA's level 1, not the tests' 0
        def step(params, state):
            loss, grads = grad_fn(params)
            updates, state = tx.update(grads, state, params, grad_fn=grad_fn, value=loss)
            return optax.apply_updates(params, updates), state

        for _ in range(steps):
            params, state = step(params, state)
        got = jax.tree.leaves(params)
    ref = jax.tree.leaves(expected)
    assert max_rel_diff(got, ref) < 1e-6  # conv + BatchNorm float64 rounding, 3-6 steps
    assert max_rel_diff(ref, jax.tree.leaves(variables["params"])) > 1e-4


def test_samon_masks_select_the_same_parameters():
    torch.manual_seed(0)
    model = TorchWRN(DEPTH, WIDTH, CLASSES).double()
    args = Namespace(
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        nesterov=False,
        rho=0.1,
        eta=0.01,
        schedule="step",
        epochs=10,
    )
    opt = make_torch_optimizer("samon", model, args)
    n_torch = sum(p.numel() for p in model.parameters() if id(p) in opt._mask)
    variables = torch_to_flax(copy.deepcopy(model), np.float32)
    import sam_jax

    mask = sam_jax.normalization_mask(
        variables["params"], lambda path, _: any(n.startswith("bn") for n in path)
    )
    n_jax = sum(
        int(np.size(leaf))
        for leaf, m in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(mask), strict=True)
        if m
    )
    assert n_torch == n_jax > 0
