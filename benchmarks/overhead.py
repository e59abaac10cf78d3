"""Section 1, optimizer overhead: one SAM step (``first_step`` + ``second_step``, which
includes the base step) against one base SGD step, on the parameter set of a WideResNet with
random weights and gradients, for sam_torch, ``pytorch_optimizer.SAM`` (both paths) and a
loop-per-tensor baseline of the popular wrapper's algorithm; SAM and ASAM. On CPU also the
ASAM perturbation alone: per-tensor passes (before), cache blocks (now), the eager floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

import sam_torch
from benchmarks._common import (
    ASAM_RHO,
    MOMENTUM,
    RHO,
    device_of,
    pytorch_optimizer,
    sized,
    sync_for,
    torch_wrn,
)
from benchmarks._timing import interleaved_times, summarize

TITLE = "1. Optimizer overhead"
#: WRN depth and width of the parameter set, timed rounds (``--repeats`` overrides them).
SIZES = {
    "smoke": {"depth": 10, "width": 1, "repeats": 3},
    "quick": {"depth": 16, "width": 8, "repeats": 6},
    "full": {"depth": 16, "width": 8, "repeats": 40},
    "gpu": {"depth": 16, "width": 8, "repeats": 100},
}
#: Expected seconds on 2 CPU cores, for the progress bar's ETA.
ESTIMATE_S = {"smoke": 5, "quick": 20, "full": 30}
WARMUP = 3


def sizes(config: Mapping[str, Any]) -> dict[str, int]:
    s = dict(sized(config, SIZES))
    if config.get("repeats"):
        s["repeats"] = int(config["repeats"])
    return s


class LoopSAM(torch.optim.Optimizer):
    """The popular SAM wrapper's algorithm, one tensor at a time (the baseline).

    Per tensor: ``old_p = p.data.clone()``, ``e_w = (p**2 if adaptive else 1) * grad * scale``,
    ``p.add_(e_w)``; restore with ``p.data = old_p``; then the base step.
    """

    def __init__(self, params: Any, base: type[torch.optim.Optimizer], rho: float,
                 adaptive: bool, **kwargs: Any) -> None:
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @torch.no_grad()
    def first_step(self) -> None:
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)

    @torch.no_grad()
    def second_step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()

    def _grad_norm(self) -> torch.Tensor:
        return torch.norm(torch.stack([
            ((torch.abs(p) if g["adaptive"] else 1.0) * p.grad).norm(p=2)
            for g in self.param_groups for p in g["params"] if p.grad is not None
        ]), p=2)


def param_set(shapes: list[torch.Size], seed: int,
              device: torch.device | str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen).mul_(0.05).to(device).requires_grad_()
        p.grad = torch.randn(s, generator=gen).mul_(0.01).to(device)
        params.append(p)
    return params


def overhead_impls(po: Any, adaptive: bool) -> dict[str, Callable[[list[torch.Tensor]], Any]]:
    """name -> builder(params) returning the optimizer; its ``run`` is one step."""
    base_kw = dict(lr=1e-3, momentum=MOMENTUM)
    rho = ASAM_RHO if adaptive else RHO

    def sgd(ps: list[torch.Tensor]) -> Any:
        return torch.optim.SGD(ps, foreach=True, **base_kw)

    def ours(**kw: Any) -> Callable[[list[torch.Tensor]], Any]:
        return lambda ps: sam_torch.SAM(
            ps, torch.optim.SGD, rho=rho, adaptive=adaptive, foreach=True, **kw, **base_kw
        )

    def ours_with_loss(ps: list[torch.Tensor]) -> Any:
        # The losses of both passes handed to first_step/second_step: the default non-finite
        # policy then checks the perturbed loss (a 0-d read) instead of reading the perturbed
        # gradient once more, as step(closure) does.
        opt = ours()(ps)
        opt.bench_loss = torch.ones((), device=ps[0].device)
        return opt

    impls: dict[str, Callable[[list[torch.Tensor]], Any]] = {
        "base SGD step": sgd,
        "sam_torch": ours(),
        "sam_torch, losses passed": ours_with_loss,
        "sam_torch foreach+swap": ours(perturb_impl="foreach", storage="swap"),
        "sam_torch foreach+copy (before)": ours(perturb_impl="foreach", storage="copy"),
    }
    if adaptive:  # SAM groups have nothing to fuse: "compiled" runs the eager kernels there
        impls["sam_torch perturb_impl='compiled'"] = ours(perturb_impl="compiled")
    if po is not None:
        for fe in (True, False):
            impls[f"pytorch_optimizer.SAM foreach={fe}"] = (
                lambda ps, fe=fe: po.SAM(ps, torch.optim.SGD, rho=rho, adaptive=adaptive,
                                         foreach=fe, **base_kw)
            )
    impls["loop per tensor (popular wrapper)"] = lambda ps: LoopSAM(
        ps, torch.optim.SGD, rho=rho, adaptive=adaptive, foreach=True, **base_kw
    )
    return impls


def one_step(opt: Any) -> Callable[[], None]:
    if isinstance(opt, torch.optim.SGD):
        return opt.step

    loss = getattr(opt, "bench_loss", None)
    if loss is not None:
        def run_with_loss() -> None:
            opt.first_step(loss=loss)
            opt.second_step(loss=loss)

        return run_with_loss

    def run() -> None:
        opt.first_step()
        opt.second_step()

    return run


def asam_perturb_per_tensor(params: list[torch.Tensor], grads: list[torch.Tensor],
                            out: list[torch.Tensor], rho: float, eta: float,
                            eps: float) -> list[torch.Tensor]:
    r"""Before: sam_core's ASAM perturbation with each element-wise pass over whole tensors.

    :math:`d = T^2 g`, :math:`T = |w| + \eta`, :math:`s = \rho / (\sqrt{\langle d, g
    \rangle} + \epsilon)`, :math:`w + s d`: four passes over every tensor build :math:`d`
    (each a round trip to memory for an 11M-parameter set), then a dot product.
    """
    import sam_core
    from sam_torch._ops import TorchOps

    ops = TorchOps(params[0].device, params[0].dtype, foreach=params[0].device.type != "cpu")
    d, sq = sam_core.direction_and_sq_norm(ops, params, grads, adaptive=True, eta=eta, out=out)
    scale = sam_core.perturbation_scale(rho, torch.sqrt(sq), eps)
    return sam_core.apply_perturbation(ops, params, d, scale, out=out)


def asam_perturb_blocked(params: list[torch.Tensor], grads: list[torch.Tensor],
                         out: list[torch.Tensor], rho: float, eta: float,
                         eps: float) -> list[torch.Tensor]:
    """After: the same, with the direction built a cache block at a time (sam_torch's CPU path)."""
    import sam_core
    from sam_torch._ops import TorchOps
    from sam_torch._sam import _blocked_direction

    ops = TorchOps(params[0].device, params[0].dtype, foreach=False)
    d, sq = _blocked_direction(ops, params, grads, out, eta)
    scale = sam_core.perturbation_scale(rho, torch.sqrt(sq), eps)
    return sam_core.apply_perturbation(ops, params, d, scale, out=out)


def asam_perturb_floor(params: list[torch.Tensor], grads: list[torch.Tensor],
                       out: list[torch.Tensor], rho: float, eta: float,
                       eps: float) -> list[torch.Tensor]:
    r"""Floor of the eager path: the blocked kernels as one hand-written loop, no Python layers.

    The same torch calls as sam_torch's cache-blocked CPU path (``abs``, then
    :math:`(t + \eta)^2` as one ``mse_loss`` pass, ``mul``, ``dot`` on each block of at
    most 256K elements, then :math:`w + s d` per tensor), written inline here without
    sam_core, the adapter or the grouping of small tensors: what the eager kernels cost
    once the library's own Python is taken away. A benchmark reference only; the library
    computes this through sam_core.
    """
    from sam_torch._sam import _CPU_BLOCK as block

    neg_eta = torch.tensor(-eta, dtype=params[0].dtype)
    parts = []
    for w, g, o in zip(params, grads, out, strict=True):
        wf, gf, of = w.reshape(-1), g.reshape(-1), o.view(-1)
        for j in range(0, wf.numel(), block):
            ob, gb = of[j:j + block], gf[j:j + block]
            torch.abs(wf[j:j + block], out=ob)
            torch._C._nn.mse_loss(ob, neg_eta, 0, out=ob)  # (|w| + eta)^2
            ob.mul_(gb)
            parts.append(torch.dot(ob, gb))
    scale = rho / (float(torch.stack(parts).sum().sqrt()) + eps)
    for w, o in zip(params, out, strict=True):
        torch.add(w, o, alpha=scale, out=o)
    return out


def asam_kernels(shapes: list[torch.Size], repeats: int, progress: Any) -> dict[str, Any]:
    """Time the ASAM perturbation alone: per-tensor passes (before), cache blocks (now), and
    the same blocked kernels without any Python layer (the floor of eager kernels)."""
    params = param_set(shapes, seed=100)
    grads = [p.grad for p in params]
    ws = [p.detach() for p in params]
    outs = {name: [torch.empty_like(w) for w in ws] for name in ("before", "now", "floor")}
    fns = {
        "per-tensor passes (before)":
            lambda: asam_perturb_per_tensor(ws, grads, outs["before"], ASAM_RHO, 0.01, 1e-12),
        "cache-blocked passes (sam_torch on CPU)":
            lambda: asam_perturb_blocked(ws, grads, outs["now"], ASAM_RHO, 0.01, 1e-12),
        "same kernels, hand-written loop (eager floor)":
            lambda: asam_perturb_floor(ws, grads, outs["floor"], ASAM_RHO, 0.01, 1e-12),
    }
    bar = progress.tick(2 + repeats, "ASAM perturbation alone")
    times = interleaved_times(fns, repeats=repeats, warmup=2, on_round=bar.update)
    bar.close()
    diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
               for a, b in zip(outs["now"], outs["before"], strict=True))
    rows = {name: summarize(ts) for name, ts in times.items()}
    return {"rows": rows, "max_rel_diff_of_w_plus_e": diff}


def run(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    s = sizes(config)
    device = device_of(config)
    po, po_err = pytorch_optimizer()
    model, source = torch_wrn(s["depth"], s["width"])
    shapes = [p.shape for p in model.parameters()]
    del model
    n_params = sum(math.prod(sh) for sh in shapes)
    out: dict[str, Any] = {
        "model": f"WRN-{s['depth']}-{s['width']} ({source})",
        "tensors": len(shapes),
        "parameters": n_params,
        "repeats": s["repeats"],
        "pytorch_optimizer": po_err or "present",
        "modes": {},
    }
    for mode, adaptive in (("SAM", False), ("ASAM", True)):
        builders = overhead_impls(po, adaptive)
        fns = {}
        for i, (name, build) in enumerate(builders.items()):
            fns[name] = one_step(build(param_set(shapes, seed=i, device=device)))
        bar = progress.tick(WARMUP + s["repeats"], f"{mode} step, {len(fns)} implementations")
        times = interleaved_times(fns, repeats=s["repeats"], warmup=WARMUP,
                                  sync=sync_for(device), on_round=bar.update)
        bar.close()
        base = summarize(times["base SGD step"])
        rows = {}
        for name, ts in times.items():
            r = summarize(ts)
            r["ratio_to_base"] = r["median_ms"] / base["median_ms"]
            r["ratio_of_minimums"] = r["min_ms"] / base["min_ms"]
            rows[name] = r
        out["modes"][mode] = rows
        # the rounds timed (fewer than asked when the quick run's time box cut them short)
        out["repeats"] = min(out["repeats"], min(len(ts) for ts in times.values()))
        del fns
    if device.type == "cpu":  # the cache-blocked passes are sam_torch's CPU path
        out["asam_kernels"] = asam_kernels(shapes, s["repeats"], progress)
    out["device"] = str(device)
    return out
