"""Float64 NumPy trajectories of the SAM family, written from the papers' formulas.

Independent of the library (no sam_core): the MLP, its hand-derived gradient and the base
optimizers come from ``tests/reference.py``; each variant's rule is spelled out here on the
flattened parameter vector.
"""

from __future__ import annotations

import numpy as np

from tests.reference import mlp_loss_and_grad

EPS = 1e-12


def _flat(xs):
    return np.concatenate([np.ravel(x) for x in xs])


def _unflat(v, like):
    out, i = [], 0
    for x in like:
        out.append(v[i : i + x.size].reshape(x.shape))
        i += x.size
    return out


def _grad(params, batch):
    return _flat(mlp_loss_and_grad(params, *batch)[1])


def _sam_e(g, rho):
    return rho * g / (np.linalg.norm(g) + EPS)


def centralized(g, like):
    """Gradient centralization of a flat gradient, tensor by tensor (Yong et al., ECCV 2020):
    each tensor of 2+ dims minus the mean of each of its rows (all dims but the first
    flattened), 1-D tensors as they are."""
    out = []
    for x in _unflat(g, like):
        rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else None
        out.append(x if rows is None else (rows - rows.sum(1)[:, None] / rows.shape[1]).reshape(x.shape))
    return _flat(out)


def trajectory(name, params, batches, base, gc=False, **hp):
    """Run variant ``name`` for ``len(batches)`` steps; returns (params, grad_evaluations).

    ``gc``: the clean gradient a perturbation is formed from is centralized first (GCSAM);
    steps that form no perturbation (LookSAM's reuse, every-k's plain steps) use it as is.
    """
    w = _flat(params)
    like = [p.copy() for p in params]

    def clean(g):
        return centralized(g, like) if gc else g

    m = None  # FriendlySAM / VaSSO average
    g_v = None  # LookSAM direction
    calls = []
    for t, batch in enumerate(batches):

        def grad_at(v, batch=batch):
            return _grad(_unflat(v, like), batch)

        n = 0
        rho = hp.get("rho", 0.05)
        if name == "sam":
            g = clean(grad_at(w))
            u = grad_at(w + _sam_e(g, rho))
            n = 2
        elif name == "gsam":
            g = clean(grad_at(w))
            gs = grad_at(w + _sam_e(g, rho))
            n = 2
            g_perp = g - (g @ gs) / (gs @ gs) * gs
            u = gs - hp["alpha"] * g_perp
        elif name == "samon":
            mask = _flat(
                [np.full(p.shape, f, dtype=bool) for p, f in zip(params, hp["mask"], strict=True)]
            )
            g = clean(grad_at(w))
            e = np.zeros_like(w)
            e[mask] = _sam_e(g[mask], rho)
            u = grad_at(w + e)
            n = 2
        elif name == "friendly":
            g = clean(grad_at(w))
            if m is None:
                d, m = g, g.copy()
            else:
                d = g - hp["sigma"] * m
                m = hp["lmbda"] * m + (1 - hp["lmbda"]) * g
            u = grad_at(w + _sam_e(d, rho))
            n = 2
        elif name == "vasso":
            g = clean(grad_at(w))
            m = g.copy() if m is None else (1 - hp["theta"]) * m + hp["theta"] * g
            u = grad_at(w + _sam_e(m, rho))
            n = 2
        elif name == "looksam":
            g = grad_at(w)
            n = 1
            if t % hp["k"] == 0:
                g_c = clean(g)
                gs = grad_at(w + _sam_e(g_c, rho))
                n = 2
                g_v = gs - (gs @ g_c) / (g_c @ g_c) * g_c
                u = gs
            else:
                u = g + hp["alpha"] * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
        elif name == "everyk":
            g = grad_at(w)
            n = 1
            u = g
            if (t + 1) % hp["k"] == 0:
                u = grad_at(w + _sam_e(clean(g), rho))
                n = 2
        elif name == "wsam":
            g = clean(grad_at(w))
            gs = grad_at(w + _sam_e(g, rho))
            n = 2
            a = hp["gamma"] / (1 - hp["gamma"])
            u = g if hp["decouple"] else (1 - a) * g + a * gs
        elif name == "msam":
            if base.bufs:  # the base optimizer's momentum (torch.optim.SGD's buffer)
                v = clean(_flat(base.bufs))  # gc: the direction, not the buffer
                e = -rho * v / (np.linalg.norm(v) + EPS)
            else:
                e = np.zeros_like(w)
            u = grad_at(w + e)
            n = 1
        else:
            raise ValueError(name)
        calls.append(n)
        w = _flat(base.step(_unflat(w, like), _unflat(u, like)))
        if name == "wsam" and hp["decouple"]:  # the sharpness term, outside the base optimizer
            w = w - hp["lr"] * hp["gamma"] / (1 - hp["gamma"]) * (gs - g)
    return _unflat(w, like), calls
