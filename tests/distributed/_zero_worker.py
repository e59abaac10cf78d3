"""What each of the 2 gloo processes runs for tests/distributed/test_zero.py: SAM with
``ZeroRedundancyOptimizer(optimizer_class=AdamW)`` under DDP (ZeRO-1), global and m-sharpness
modes, the per-rank optimizer-state bytes, and a consolidated checkpoint resumed mid-run."""

from __future__ import annotations

import gc
import os
from typing import Any

import torch
import torch.distributed as dist

from tests.distributed import reference as ref
from tests.distributed._torch_worker import MLP, WORLD, _shard, mse

LR, WD = 0.01, 0.01


def _state_bytes(state: Any) -> int:
    return sum(
        t.numel() * t.element_size()
        for st in state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


def _build(params: list[Any]) -> tuple[Any, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from sam_torch import SAM

    model = DistributedDataParallel(MLP(params))
    sam = SAM(model.parameters(), ZeroRedundancyOptimizer, optimizer_class=torch.optim.AdamW,
              lr=LR, weight_decay=WD, rho=ref.RHO, sam_eps=ref.EPS)
    return model, sam


def _steps(model: Any, sam: Any, problem: dict[str, Any], rank: int, steps: range, m: bool) -> None:
    from sam_torch import clean_pass

    for step in steps:
        x, y = _shard(problem, step, rank)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y, calls: list = []) -> Any:  # noqa: B006
            with clean_pass(model, m_sharpness=m and not calls):  # the first call is clean
                loss = mse(model(x), y)
                loss.backward()
            calls.append(1)
            return loss

        sam.step(closure)


def run(rank: int, problem: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    n = len(problem["xs"])
    for name, m in (("zero_global", False), ("zero_m", True)):
        model, sam = _build(problem["params"])
        _steps(model, sam, problem, rank, range(n), m)
        zero = sam.base_optimizer
        results[name] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "local_state_bytes": _state_bytes(zero.optim.state),
            "sam_state_is_zero_state": sam.state is zero.state,
            "local_params": sum(len(g["params"]) for g in zero.optim.param_groups),
        }
    # Checkpoint after n - 1 steps, resume in a fresh model and optimizer, take the last step.
    model, sam = _build(problem["params"])
    _steps(model, sam, problem, rank, range(n - 1), False)
    sam.consolidate_state_dict(to=0)
    box = [sam.state_dict() if rank == 0 else None]
    try:
        sam.state_dict() if rank == 1 else None
        results["unconsolidated_error"] = None
    except RuntimeError as exc:
        results["unconsolidated_error"] = str(exc)
    dist.broadcast_object_list(box, src=0)
    weights = [p.detach().numpy().copy() for p in model.parameters()]
    model2, sam2 = _build(weights)
    sam2.load_state_dict(box[0])
    _steps(model2, sam2, problem, rank, range(n - 1, n), False)
    results["resumed"] = [p.detach().clone() for p in model2.parameters()]
    results["checkpoint_groups"] = [
        {k: v for k, v in g.items() if k in ("rho", "sam_eps", "lr")} for g in box[0]["param_groups"]
    ]
    results["checkpoint_states"] = len(box[0]["state"])
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        from sam_torch import MomentumSAM

        MomentumSAM(MLP(problem["params"]).parameters(), ZeroRedundancyOptimizer,
                    optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9)
        results["momentum_sam_error"] = None
    except ValueError as exc:
        results["momentum_sam_error"] = str(exc)
    return results


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(run(rank, ref.make_problem()), os.path.join(out_dir, f"rank{rank}.pt"))
        # ZeRO's and DDP's objects hold the process group; one kept alive by a reference cycle
        # would be freed only at interpreter exit, after the group is gone, which aborts the
        # process ("terminate called without an active exception"). Free them first, and let
        # no rank tear the group down while the other still uses it.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
