"""Float64 NumPy references, written from the papers' formulas, independent of the library.

A two-layer tanh MLP with a hand-derived gradient, SAM/ASAM perturbations written out, and
torch.optim's SGD and AdamW update rules, so trajectories can be checked end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Parameter order matches torch.nn.Sequential(Linear(d, h), Tanh(), Linear(h, o)).parameters()
NAMES = ("W1", "b1", "W2", "b2")


def init_mlp(d: int = 5, h: int = 7, o: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((h, d)) * 0.5,
        rng.standard_normal(h) * 0.1,
        rng.standard_normal((o, h)) * 0.5,
        rng.standard_normal(o) * 0.1,
    ]


def mlp_loss_and_grad(params, x, t):
    """Mean squared error of the MLP and its gradient, by hand."""
    w1, b1, w2, b2 = params
    a = np.tanh(x @ w1.T + b1)
    y = a @ w2.T + b2
    loss = np.mean((y - t) ** 2)
    dy = 2.0 * (y - t) / y.size
    dw2 = dy.T @ a
    db2 = dy.sum(0)
    dz = (dy @ w2) * (1.0 - a**2)
    dw1 = dz.T @ x
    db1 = dz.sum(0)
    return loss, [dw1, db1, dw2, db2]


def sam_perturbation(params, grads, rho, adaptive=False, eta=0.01, eps=1e-12, groups=None):
    """e_i = rho_i T_i^2 g_i / (||T g|| + eps), T_i = |w_i| + eta for adaptive params, else 1.

    ``groups``: optional per-parameter list of (rho, adaptive, eta) overriding the arguments.
    """
    cfg = groups or [(rho, adaptive, eta)] * len(params)
    ts = [np.abs(w) + et if ad else np.ones_like(w) for w, (_, ad, et) in zip(params, cfg, strict=True)]
    norm = np.sqrt(sum(np.sum((t * g) ** 2) for t, g in zip(ts, grads, strict=True)))
    return [r * t**2 * g / (norm + eps) for t, g, (r, _, _) in zip(ts, grads, cfg, strict=True)]


@dataclass
class SGDRef:
    """torch.optim.SGD(lr, momentum, weight_decay, dampening=0, nesterov=False)."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    bufs: list = field(default_factory=list)

    def step(self, params, grads):
        out = []
        first = not self.bufs
        for i, (w, g) in enumerate(zip(params, grads, strict=True)):
            d = g + self.weight_decay * w
            if self.momentum:
                if first:
                    self.bufs.append(d.copy())
                else:
                    self.bufs[i] = self.momentum * self.bufs[i] + d
                d = self.bufs[i]
            out.append(w - self.lr * d)
        return out


@dataclass
class AdamWRef:
    """torch.optim.AdamW(lr, betas, eps, weight_decay), amsgrad=False."""

    lr: float
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    t: int = 0
    m: list = field(default_factory=list)
    v: list = field(default_factory=list)

    def step(self, params, grads):
        b1, b2 = self.betas
        self.t += 1
        if not self.m:
            self.m = [np.zeros_like(w) for w in params]
            self.v = [np.zeros_like(w) for w in params]
        out = []
        for i, (w, g) in enumerate(zip(params, grads, strict=True)):
            w = w * (1 - self.lr * self.weight_decay)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            mhat = self.m[i] / (1 - b1**self.t)
            vhat = self.v[i] / (1 - b2**self.t)
            out.append(w - self.lr * mhat / (np.sqrt(vhat) + self.eps))
        return out


def sam_trajectory(params, batches, base, **sam_kwargs):
    """Run SAM with a reference base optimizer over ``batches`` [(x, t), ...]."""
    params = [p.copy() for p in params]
    for x, t in batches:
        _, g = mlp_loss_and_grad(params, x, t)
        e = sam_perturbation(params, g, **sam_kwargs)
        _, g_adv = mlp_loss_and_grad([w + ei for w, ei in zip(params, e, strict=True)], x, t)
        params = base.step(params, g_adv)
    return params


def make_batches(n_steps: int, n: int = 16, d: int = 5, o: int = 3, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, d)), rng.standard_normal((n, o))) for _ in range(n_steps)]
