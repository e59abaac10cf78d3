"""The rho ramp for every SAM-family form: sam_torch.RhoWarmup on each torch class and
sam_jax.rho_warmup_schedule through optax.inject_hyperparams on each transformation give the
same float64 trajectory (each form's rule is checked against its paper elsewhere; LookSAM's
under a ramp in test_looksam_rule.py), the ramp changes it, and the examples accept
--rho-warmup-epochs for every form."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sam_jax  # noqa: E402
import sam_torch  # noqa: E402
from tests.helpers import jax_x64, max_rel_diff  # noqa: E402
from tests.reference import init_mlp, make_batches  # noqa: E402
from tests.variants.test_jax_variants import _run as jax_run  # noqa: E402
from tests.variants.test_torch_variants import _closure, _model  # noqa: E402

LR, MOM, WD, RHO, WARMUP, STEPS = 0.1, 0.9, 5e-4, 0.3, 4, 8
SGD = torch.optim.SGD
MASK = [False, True, False, True]

# name: (torch class and its own arguments, JAX factory, its static arguments and its own
# arguments, weight decay)
FORMS = {
    "sam": (sam_torch.SAM, {}, sam_jax.sam, (), {}, WD),
    "asam": (sam_torch.SAM, {"adaptive": True}, sam_jax.sam, ("adaptive",),
             {"adaptive": True}, WD),
    "gsam": (sam_torch.GSAM, {"alpha": 0.3}, sam_jax.gsam, (), {"alpha": 0.3}, WD),
    "samon": (sam_torch.SAMON, "mask", sam_jax.samon, ("mask",), {"mask": MASK}, WD),
    "fsam": (sam_torch.FriendlySAM, {"sigma": 0.8, "lmbda": 0.6}, sam_jax.friendly_sam, (),
             {"sigma": 0.8, "lmbda": 0.6}, WD),
    "vasso": (sam_torch.VaSSO, {"theta": 0.5}, sam_jax.vasso, (), {"theta": 0.5}, WD),
    "looksam": (sam_torch.LookSAM, {"k": 3, "alpha": 0.5}, sam_jax.looksam, ("k",),
                {"k": 3, "alpha": 0.5}, WD),
    "everyk": (sam_torch.EveryKSAM, {"k": 2}, sam_jax.every_k_sam, ("k",), {"k": 2}, WD),
    "wsam": (sam_torch.WSAM, {"gamma": 0.7, "decouple": False}, sam_jax.wsam, (),
             {"gamma": 0.7}, WD),
    # no weight decay: torch's momentum buffer would hold it, the JAX trace does not
    "msam": (sam_torch.MomentumSAM, {}, sam_jax.momentum_sam, (), {"momentum": MOM}, 0.0),
}


def _torch(name, params0, batches, warmup):
    cls, own, *_, wd = FORMS[name]
    model = _model(params0)
    ps = list(model.parameters())
    own = {"norm_params": [ps[1], ps[3]]} if own == "mask" else own
    opt = cls(ps, SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=wd, **own)
    ramp = sam_torch.RhoWarmup(opt, warmup)
    for batch in batches:
        opt.step(_closure(model, opt, batch, []))
        ramp.step()
    return [p.detach().numpy() for p in model.parameters()]


def _jax(name, params0, batches, warmup):
    *_, factory, static, own, wd = FORMS[name]
    with jax_x64():
        first = optax.inject_hyperparams(factory, static_args=static)(
            rho=sam_jax.rho_warmup_schedule(RHO, warmup), **own
        )
        tx = optax.chain(first, optax.add_decayed_weights(wd), optax.sgd(LR, momentum=MOM))
        got, _, _ = jax_run(tx, [jnp.asarray(p) for p in params0], batches)
    return got


@pytest.mark.parametrize("name", sorted(FORMS))
def test_every_form_ramps_rho_the_same_in_both_backends(name):
    params0, batches = init_mlp(), make_batches(STEPS, seed=6)
    ramped = _torch(name, params0, batches, WARMUP)
    assert max_rel_diff(_jax(name, params0, batches, WARMUP), ramped) < 1e-10
    # the ramp matters: a constant rho gives another trajectory
    assert max_rel_diff(_torch(name, params0, batches, 0), ramped) > 1e-6


@pytest.mark.parametrize("name", sorted(set(FORMS) - {"sam"}))
def test_examples_take_rho_warmup_epochs_for_every_form(name):
    from examples.cli import make_config
    from examples.optimizers import make_optax, make_torch_optimizer

    config = make_config(optimizer=name, rho=0.1, rho_warmup_epochs=2.0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    assert all(g["rho"] == 0.1 for g in make_torch_optimizer(name, model, config).param_groups)
    tx = make_optax(name, config, steps_per_epoch=5)
    state = tx.init({"bn": {"scale": jnp.ones(2)}, "dense": {"kernel": jnp.ones((3, 2))}})
    assert float(state[0].hyperparams["rho"]) == 0.0  # the ramp's first value
