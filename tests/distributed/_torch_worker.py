"""What each of the 2 gloo processes runs (imported by ``torch.multiprocessing.spawn``).

Every scenario trains the MLP of :mod:`tests.distributed.reference` with ``sam_torch.SAM`` on
this rank's half of each batch and records what the test compares with the NumPy
reference: the final weights, the first step's perturbed point and perturbed gradient, and
whether ``restore()`` gave the weights back bit for bit. Results go to ``out_dir/rank<r>.pt``.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.distributed import reference as ref

WORLD = 2


class MLP(nn.Module):
    """The reference network, ``x @ W`` layout."""

    def __init__(self, params: list[Any]) -> None:
        super().__init__()
        for name, value in zip(ref.NAMES, params, strict=True):
            setattr(self, name, nn.Parameter(torch.tensor(value, dtype=torch.float64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum() / out.shape[0]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The full value of a tensor or DTensor, as a plain CPU tensor."""
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach().clone()


def _shard(problem: dict[str, Any], step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(problem["xs"][step]).chunk(WORLD)[rank]
    y = torch.tensor(problem["ys"][step]).chunk(WORLD)[rank]
    return x, y


def train(
    model: nn.Module,
    problem: dict[str, Any],
    rank: int,
    *,
    clean_pass: Any,
    storage: str = "auto",
    adaptive: bool = False,
    perturb_impl: str = "auto",
) -> dict[str, Any]:
    """SAM + SGD(momentum) with the two-step API; ``clean_pass()`` wraps the clean pass."""
    from sam_torch import SAM

    sam = SAM(model.parameters(), torch.optim.SGD, lr=ref.LR, momentum=ref.MOMENTUM,
              rho=ref.RHO, adaptive=adaptive, eta=ref.ETA, sam_eps=ref.EPS, storage=storage,
              perturb_impl=perturb_impl)
    params = list(model.parameters())
    # Which storage SAM chose (swap: p.data is exchanged with a spare buffer and back).
    record: dict[str, Any] = {"norms": [], "swap": sam._use_swap(params)}
    for step in range(len(problem["xs"])):
        x, y = _shard(problem, step, rank)
        with clean_pass():
            mse(model(x), y).backward()
        before = [p.detach().clone() for p in params]
        sam.first_step(zero_grad=True)
        record["norms"].append(float(_local(sam.grad_norm)))
        mse(model(x), y).backward()
        if step == 0:
            record["perturbed"] = [_local(p) for p in params]
            record["u"] = [_local(p.grad) for p in params]
            # restore() gives w back bit for bit and leaves the gradients alone; then the
            # step is redone from the restored weights (same numbers if restore is exact).
            sam.restore()
            record["restored_exact"] = all(
                torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True)
            )
            record["u_after_restore"] = [_local(p.grad) for p in params]
            sam.zero_grad()
            with clean_pass():
                mse(model(x), y).backward()
            sam.first_step(zero_grad=True)
            mse(model(x), y).backward()
        sam.second_step(zero_grad=True)
    record["params"] = [_local(p) for p in model.parameters()]
    return record


def _ddp(problem: dict[str, Any], **ddp_kwargs: Any) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(MLP(problem["params"]), **ddp_kwargs)


def run_scenarios(rank: int, problem: dict[str, Any]) -> dict[str, Any]:
    from sam_torch import clean_pass

    results: dict[str, Any] = {}
    for name, m_sharpness, adaptive, storage, bucket_view in [
        ("ddp_global", False, False, "auto", False),
        ("ddp_global_copy", False, False, "copy", False),
        ("ddp_global_bucket_view", False, False, "auto", True),
        ("ddp_global_asam", False, True, "auto", False),
        ("ddp_m", True, False, "auto", False),
        ("ddp_m_bucket_view", True, False, "auto", True),
        ("ddp_m_asam", True, True, "copy", False),
    ]:
        model = _ddp(problem, gradient_as_bucket_view=bucket_view)
        results[name] = train(
            model, problem, rank, adaptive=adaptive, storage=storage,
            clean_pass=lambda model=model, m=m_sharpness: clean_pass(model, m_sharpness=m),
        )

    results["ddp_m_closure"] = _closure_m_sharpness(_ddp(problem), problem, rank)

    # The common mistake: only the backward under no_sync. DDP decided in forward() that
    # this backward all-reduces, so this is global SAM, not m-sharpness.
    model = _ddp(problem)
    results["ddp_backward_only_no_sync"] = _mistake(model, problem, rank)
    return results


def _closure_m_sharpness(model: nn.Module, problem: dict[str, Any], rank: int) -> dict:
    """m-sharpness through ``step(closure)``: the closure's first call is the clean pass."""
    from sam_torch import SAM, clean_pass

    sam = SAM(model.parameters(), torch.optim.SGD, lr=ref.LR, momentum=ref.MOMENTUM,
              rho=ref.RHO, eta=ref.ETA, sam_eps=ref.EPS)
    for step in range(len(problem["xs"])):
        x, y = _shard(problem, step, rank)
        calls = []

        def closure(x: torch.Tensor = x, y: torch.Tensor = y, calls: list = calls) -> Any:
            sam.zero_grad()
            with clean_pass(model, m_sharpness=not calls):  # only the first call is clean
                loss = mse(model(x), y)
                loss.backward()
            calls.append(1)
            return loss

        sam.step(closure)
    return {"params": [_local(p) for p in model.parameters()]}


def _mistake(model: nn.Module, problem: dict[str, Any], rank: int) -> dict[str, Any]:
    from sam_torch import SAM

    sam = SAM(model.parameters(), torch.optim.SGD, lr=ref.LR, momentum=ref.MOMENTUM,
              rho=ref.RHO, eta=ref.ETA, sam_eps=ref.EPS)
    for step in range(len(problem["xs"])):
        x, y = _shard(problem, step, rank)
        loss = mse(model(x), y)
        with model.no_sync():
            loss.backward()
        sam.first_step(zero_grad=True)
        mse(model(x), y).backward()
        sam.second_step(zero_grad=True)
    return {"params": [_local(p) for p in model.parameters()]}


def run_fsdp(rank: int, problem: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from sam_torch import clean_pass

    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, Any] = {}
    for name, adaptive, impl in [
        ("fsdp_global", False, "per_tensor"),
        ("fsdp_global_foreach", False, "foreach"),
        ("fsdp_global_asam", True, "foreach"),
    ]:
        model = MLP(problem["params"])
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        results[name] = train(model, problem, rank, adaptive=adaptive, perturb_impl=impl,
                              clean_pass=lambda model=model: clean_pass(model))
        try:
            with clean_pass(model, m_sharpness=True):
                pass
        except NotImplementedError as exc:
            results[name]["m_sharpness_error"] = str(exc)
    return results


def run_dtensor(rank: int, problem: dict[str, Any]) -> dict[str, Any]:
    """DTensor parameters sharded with ``distribute_tensor``, without FSDP.

    The gradient is the full-batch clean gradient, sharded like the parameters; the norm
    must be the full norm (not this shard's) and ``w + e`` must be global SAM's.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from sam_torch import SAM, TorchOps

    mesh = init_device_mesh("cpu", (WORLD,))
    x, y = problem["xs"][0], problem["ys"][0]
    _, grads = ref.loss_and_grad(problem["params"], x, y)
    results: dict[str, Any] = {}
    for impl in ("per_tensor", "foreach"):
        for adaptive in (False, True):
            params = [
                nn.Parameter(distribute_tensor(torch.tensor(w), mesh, [Shard(0)]))
                for w in problem["params"]
            ]
            for p, g in zip(params, grads, strict=True):
                p.grad = distribute_tensor(torch.tensor(g), mesh, [Shard(0)])
            ops = TorchOps(torch.device("cpu"), torch.float64, foreach=impl == "foreach")
            sq = ops.sum_of_squares([p.grad for p in params])
            sam = SAM(params, torch.optim.SGD, lr=ref.LR, rho=ref.RHO, adaptive=adaptive,
                      eta=ref.ETA, sam_eps=ref.EPS, perturb_impl=impl)
            before = [p.detach().full_tensor() for p in params]
            sam.first_step()
            results[f"dtensor_{impl}_{'asam' if adaptive else 'sam'}"] = {
                "sq_norm": float(sq.full_tensor() if hasattr(sq, "full_tensor") else sq),
                "sq_norm_placements": str(getattr(sq, "placements", None)),
                "local_shard_numel": params[0].to_local().numel(),
                "grad_norm": float(_local(sam.grad_norm)),
                "perturbed": [_local(p) for p in params],
                "stack_of_norms": str(torch.stack(torch._foreach_norm(
                    [p.grad for p in params], 2)).placements),
            }
            sam.restore()
            results[f"dtensor_{impl}_{'asam' if adaptive else 'sam'}"]["restored_exact"] = all(
                torch.equal(p.detach().full_tensor(), b) for p, b in zip(params, before,
                                                                          strict=True)
            )
    return results


def worker(rank: int, port: int, out_dir: str, parts: tuple[str, ...]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        problem = ref.make_problem()
        results: dict[str, Any] = {}
        if "ddp" in parts:
            results.update(run_scenarios(rank, problem))
        if "fsdp" in parts:
            results.update(run_fsdp(rank, problem))
        if "dtensor" in parts:
            results.update(run_dtensor(rank, problem))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        del results
        gc.collect()  # nothing that holds the group freed after it is gone (see _zero_worker)
        dist.barrier()
    finally:
        dist.destroy_process_group()
