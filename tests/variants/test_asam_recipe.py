"""The official ASAM recipe (sam_torch.asam_param_groups, sam_jax.asam_mask) against a float64
transcription of the official ASAM step: T_w = |w| + eta on the parameters named 'weight',
plain SAM on the others, one norm + 1e-16, then SGD with momentum and weight decay."""

from __future__ import annotations

import numpy as np
import pytest

from tests.reference import SGDRef

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sam_jax  # noqa: E402
import sam_torch  # noqa: E402
from tests.helpers import jax_x64, max_rel_diff  # noqa: E402

RHO, ETA, LR, MOM, WD, STEPS = 0.5, 0.01, 0.05, 0.9, 5e-4, 5


def _batches(n=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((8, 4)), rng.standard_normal((8, 2))) for _ in range(n)]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()


def _loss(model, x, t):
    return ((model(torch.from_numpy(x)) - torch.from_numpy(t)) ** 2).mean()


def official_asam_trajectory(model, batches, *, rho, eta, adaptive_if):
    """The official step by hand: gradients from autograd, everything else in NumPy."""
    named = list(model.named_parameters())
    sgd = SGDRef(LR, MOM, WD)
    for x, t in batches:
        model.zero_grad()
        _loss(model, x, t).backward()
        w = [p.detach().numpy().copy() for _, p in named]
        g = [p.grad.numpy().copy() for _, p in named]
        tw = [np.abs(wi) + eta if adaptive_if(n) else np.ones_like(wi) for (n, _), wi in zip(named, w, strict=True)]
        norm = np.sqrt(sum(np.sum((ti * gi) ** 2) for ti, gi in zip(tw, g, strict=True))) + 1e-16
        with torch.no_grad():
            for (_, p), wi, ti, gi in zip(named, w, tw, g, strict=True):
                p.copy_(torch.from_numpy(wi + rho * ti * ti * gi / norm))
        model.zero_grad()
        _loss(model, x, t).backward()
        gs = [p.grad.numpy().copy() for _, p in named]
        new_w = sgd.step(w, gs)
        with torch.no_grad():
            for (_, p), wi in zip(named, new_w, strict=True):
                p.copy_(torch.from_numpy(wi))
    return [p.detach().numpy().copy() for _, p in named]


def _sam_run(opt, model, batches):
    for x, t in batches:
        def closure(x=x, t=t):
            loss = _loss(model, x, t)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().numpy().copy() for p in model.parameters()]


@pytest.mark.parametrize("normalization", ["official", "sam"])
def test_torch_groups_give_the_official_step(normalization):
    norm_names = {"1.weight", "1.bias"}

    def adaptive_if(name):
        return "weight" in name and not (normalization == "sam" and name in norm_names)

    expected = official_asam_trajectory(_mlp(), _batches(), rho=RHO, eta=ETA, adaptive_if=adaptive_if)
    model = _mlp()
    groups = sam_torch.asam_param_groups(model, eta=ETA, normalization=normalization)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [sorted(names[id(p)] for p in g["params"]) for g in groups] == (
        [["0.weight", "1.weight", "3.weight"], ["0.bias", "1.bias", "3.bias"]]
        if normalization == "official"
        else [["0.weight", "3.weight"], ["0.bias", "1.bias", "1.weight", "3.bias"]]
    )
    opt = sam_torch.SAM(groups, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    got = _sam_run(opt, model, _batches())
    assert max_rel_diff(got, expected) < 1e-11
    # every parameter adaptive (SAM(adaptive=True)) is another algorithm
    model_all = _mlp()
    opt_all = sam_torch.SAM(model_all.parameters(), torch.optim.SGD, rho=RHO, adaptive=True,
                            lr=LR, momentum=MOM, weight_decay=WD)
    assert max_rel_diff(_sam_run(opt_all, model_all, _batches()), expected) > 1e-6


def test_torch_groups_take_options_and_reject_owned_keys():
    model = _mlp()
    groups = sam_torch.asam_param_groups(model, rho=1.0, weight_decay=0.0)
    assert all(g["rho"] == 1.0 and g["weight_decay"] == 0.0 for g in groups)
    with pytest.raises(TypeError, match="adaptive"):
        sam_torch.asam_param_groups(model, adaptive=False)
    with pytest.raises(ValueError, match="normalization"):
        sam_torch.asam_param_groups(model, normalization="none")
    with pytest.raises(TypeError, match="Module"):
        sam_torch.asam_param_groups(list(model.parameters()))


def _jax_params(model):
    """The torch MLP's parameters under Flax's names (layout kept: T_w is element-wise)."""
    p = [jnp.asarray(x.detach().numpy()) for x in model.parameters()]
    return {
        "Dense_0": {"kernel": p[0], "bias": p[1]},
        "LayerNorm_0": {"scale": p[2], "bias": p[3]},
        "Dense_1": {"kernel": p[4], "bias": p[5]},
    }


def _jax_loss(params, x, t):
    h = x @ params["Dense_0"]["kernel"].T + params["Dense_0"]["bias"]
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    h = (h - mu) / jnp.sqrt(var + 1e-5) * params["LayerNorm_0"]["scale"] + params["LayerNorm_0"]["bias"]
    y = jnp.tanh(h) @ params["Dense_1"]["kernel"].T + params["Dense_1"]["bias"]
    return jnp.mean((y - t) ** 2)


@pytest.mark.parametrize("normalization", ["official", "sam"])
def test_jax_mask_gives_the_official_step_and_torch_agrees(normalization):
    norm_names = {"1.weight", "1.bias"}

    def adaptive_if(name):
        return "weight" in name and not (normalization == "sam" and name in norm_names)

    expected = official_asam_trajectory(_mlp(), _batches(), rho=RHO, eta=ETA, adaptive_if=adaptive_if)
    with jax_x64():
        params = _jax_params(_mlp())
        mask = sam_jax.asam_mask(params, normalization=normalization)
        assert mask["LayerNorm_0"] == {"scale": normalization == "official", "bias": False}
        assert mask["Dense_0"] == {"kernel": True, "bias": False}
        tx = optax.chain(
            sam_jax.sam(RHO, adaptive=mask, eta=ETA, eps=1e-16),
            optax.add_decayed_weights(WD),
            optax.sgd(LR, momentum=MOM),
        )
        state = tx.init(params)

        @jax.jit
        def step(params, state, x, t):
            grads = jax.grad(_jax_loss)(params, x, t)
            u, state = tx.update(grads, state, params, grad_fn=jax.grad(lambda p: _jax_loss(p, x, t)))
            return optax.apply_updates(params, u), state

        for x, t in _batches():
            params, state = step(params, state, jnp.asarray(x), jnp.asarray(t))
        got = [np.asarray(params[m][k]) for m, k in [
            ("Dense_0", "kernel"), ("Dense_0", "bias"), ("LayerNorm_0", "scale"),
            ("LayerNorm_0", "bias"), ("Dense_1", "kernel"), ("Dense_1", "bias"),
        ]]
    assert max_rel_diff(got, expected) < 1e-11
    model = _mlp()  # the torch recipe on the same network: the same trajectory
    opt = sam_torch.SAM(sam_torch.asam_param_groups(model, normalization=normalization),
                        torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    assert max_rel_diff(_sam_run(opt, model, _batches()), got) < 1e-11


def test_jax_adaptive_takes_the_mask_function_and_rejects_other_values():
    with jax_x64():
        params = _jax_params(_mlp())
        x, t = (jnp.asarray(a) for a in _batches(1)[0])
        grads = jax.grad(_jax_loss)(params, x, t)
        by_fn = sam_jax.sam(RHO, adaptive=sam_jax.asam_mask, eps=1e-16)
        by_tree = sam_jax.sam(RHO, adaptive=sam_jax.asam_mask(params), eps=1e-16)
        gf = jax.grad(lambda p: _jax_loss(p, x, t))
        u1, _ = by_fn.update(grads, by_fn.init(params), params, grad_fn=gf)
        u2, _ = by_tree.update(grads, by_tree.init(params), params, grad_fn=gf)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        bad = sam_jax.sam(RHO, adaptive={"Dense_0": True})
        with pytest.raises(ValueError, match="structure"):
            bad.update(grads, bad.init(params), params, grad_fn=gf)
    with pytest.raises(TypeError, match="adaptive"):
        sam_jax.sam(RHO, adaptive=1)
