"""Independent float64 references of the m-sharpness step, written from its definition.

Split the batch into k = B / m consecutive chunks; for chunk c, with L_c its mean loss and
g_c = grad L_c(w): e_c = rho T_w^2 g_c / (||T_w g_c|| + eps) (T_w = 1 for SAM, |w| + eta for
ASAM; per-group rho/adaptive/eta, one norm over every group); the step's gradient is
G = (1/k) sum_c grad L_c(w + e_c). Nothing here calls sam_core, sam_torch or sam_jax.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from tests import reference as ref


def numpy_mlp(params, x, t, m, groups, eps=1e-12):
    """The NumPy MLP of ``tests/reference.py`` (MSE, hand-derived gradient).

    ``groups``: per-parameter ``(rho, adaptive, eta)``. Returns ``(G, loss, perturbed_loss,
    mean norm)``.
    """
    k = len(x) // m
    total = [np.zeros_like(w) for w in params]
    losses, plosses, norms = [], [], []
    for c in range(k):
        xc, tc = x[c * m:(c + 1) * m], t[c * m:(c + 1) * m]
        loss, g = ref.mlp_loss_and_grad(params, xc, tc)
        ts = [np.abs(w) + eta if ad else np.ones_like(w) for w, (_, ad, eta) in zip(params, groups, strict=True)]
        norm = np.sqrt(sum(np.sum((tw * gw) ** 2) for tw, gw in zip(ts, g, strict=True)))
        e = ref.sam_perturbation(params, g, None, eps=eps, groups=groups)
        ploss, pg = ref.mlp_loss_and_grad([w + ew for w, ew in zip(params, e, strict=True)], xc, tc)
        total = [a + b for a, b in zip(total, pg, strict=True)]
        losses.append(loss)
        plosses.append(ploss)
        norms.append(norm)
    return [a / k for a in total], np.mean(losses), np.mean(plosses), np.mean(norms)


def torch_autograd(model, loss_fn, chunks, groups, eps=1e-12):
    """A plain autograd loop over chunks on copies of ``model`` (float64).

    ``groups``: a list of ``(params, rho, adaptive, eta)`` of ``model``'s parameters; a
    parameter in no group is not perturbed and not in the norm (SAM-ON's unmasked ones).
    Returns ``(G per parameter of model.parameters(), loss, perturbed_loss, mean norm,
    running statistics)`` where the statistics are the mean over chunks of the buffers of a
    fresh copy of the model after a clean forward of that chunk (``num_batches_tracked`` of
    the first copy).
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    names = [n for n, _ in model.named_parameters()]
    index = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    cfg = [None] * len(names)
    for params, rho, adaptive, eta in groups:
        for p in params:
            cfg[index[id(p)]] = (rho, adaptive, eta)
    total = None
    losses, plosses, norms, stats = [], [], [], []
    for chunk in chunks:
        clean = copy.deepcopy(model)
        loss = loss_fn(clean, chunk)
        grads = torch.autograd.grad(loss, list(clean.parameters()))
        stats.append({n: b.detach().clone() for n, b in clean.named_buffers()})
        ws = [p.detach() for p in model.parameters()]
        ts = [
            torch.zeros_like(w) if c is None else (w.abs() + c[2]) if c[1] else torch.ones_like(w)
            for w, c in zip(ws, cfg, strict=True)
        ]
        norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(ts, grads, strict=True)))
        perturbed = copy.deepcopy(model)
        for mod in perturbed.modules():
            if isinstance(mod, _BatchNorm):
                mod.track_running_stats = False
        with torch.no_grad():
            for p, w, t, g, c in zip(perturbed.parameters(), ws, ts, grads, cfg, strict=True):
                p.copy_(w if c is None else w + c[0] * t * t * g / (norm + eps))
        ploss = loss_fn(perturbed, chunk)
        pgrads = torch.autograd.grad(ploss, list(perturbed.parameters()))
        total = list(pgrads) if total is None else [a + b for a, b in zip(total, pgrads, strict=True)]
        losses.append(loss.detach())
        plosses.append(ploss.detach())
        norms.append(norm)
    k = len(chunks)
    mean_stats = {}
    for n in stats[0]:
        if stats[0][n].is_floating_point():
            mean_stats[n] = torch.stack([s[n] for s in stats]).mean(0)
        else:
            mean_stats[n] = stats[0][n]
    return (
        [g / k for g in total],
        torch.stack(losses).mean(),
        torch.stack(plosses).mean(),
        torch.stack(norms).mean(),
        mean_stats,
    )


def sgd_momentum(weights: list[Any], grads: list[Any], bufs: list[Any] | None, lr, momentum, wd):
    """torch.optim.SGD's rule (dampening 0, no Nesterov) on NumPy arrays; returns (w, bufs)."""
    out, new_bufs = [], []
    for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
        d = g + wd * w
        b = d.copy() if bufs is None else momentum * bufs[i] + d
        new_bufs.append(b)
        out.append(w - lr * b)
    return out, new_bufs
