"""ZeRO-1 (torch.distributed.optim.ZeroRedundancyOptimizer) as SAM's base optimizer under DDP on
2 gloo processes: float64 equality with single-process SAM on the whole batch and with the
m-sharpness definition, the optimizer state sharded across ranks, and an exact resume."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

import sam_torch
from tests.distributed import reference as ref
from tests.distributed._torch_worker import MLP, WORLD, mse
from tests.distributed._zero_worker import LR, WD
from tests.reference import AdamWRef

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    from tests.distributed._zero_worker import worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("zero")
    mp.spawn(worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference(problem: dict[str, Any], m_sharpness: bool) -> list[np.ndarray]:
    """The SAM direction of reference.py (global or per-shard) fed to torch's AdamW rule."""
    params = [w.copy() for w in problem["params"]]
    adamw = AdamWRef(LR, weight_decay=WD)
    for x, y in zip(problem["xs"], problem["ys"], strict=True):
        u = ref.sam_gradient(params, x, y, world=WORLD, m_sharpness=m_sharpness)["u"]
        params = adamw.step(params, u)
    return params


def _single_process_sam(problem: dict[str, Any]) -> list[np.ndarray]:
    model = MLP(problem["params"])
    sam = sam_torch.SAM(model.parameters(), torch.optim.AdamW, lr=LR, weight_decay=WD,
                        rho=ref.RHO, sam_eps=ref.EPS)
    for x, y in zip(problem["xs"], problem["ys"], strict=True):
        x, y = torch.tensor(x), torch.tensor(y)
        sam.step(lambda x=x, y=y: mse(model(x), y).backward())
    return [p.detach().numpy() for p in model.parameters()]


def _close(actual: list[torch.Tensor], expected: list[np.ndarray]) -> None:
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-12, atol=1e-13)


def test_zero_global_is_full_batch_sam_and_m_mode_is_the_definition(results) -> None:
    problem = ref.make_problem()
    global_ref = _reference(problem, m_sharpness=False)
    m_ref = _reference(problem, m_sharpness=True)
    assert max(np.abs(a - b).max() for a, b in zip(global_ref, m_ref, strict=True)) > 1e-6
    single = _single_process_sam(problem)
    for res in results:
        _close(res["zero_global"]["params"], global_ref)
        _close(res["zero_global"]["params"], single)
        _close(res["zero_m"]["params"], m_ref)


def test_zero_shards_the_optimizer_state_and_resumes_exactly(results) -> None:
    problem = ref.make_problem()
    full = 2 * sum(w.size * 8 for w in problem["params"])  # AdamW: exp_avg + exp_avg_sq, float64
    local = [res["zero_global"]["local_state_bytes"] for res in results]
    assert sum(local) == full and max(local) < full  # each rank holds only its shard
    assert sorted(local) == [496, 560]  # greedy by size: w1 (35 numbers) | w2, b1, b2 (31)
    assert all(res["zero_global"]["local_params"] < len(problem["params"]) for res in results)
    assert all(res["zero_global"]["sam_state_is_zero_state"] for res in results)
    for res in results:  # the checkpoint carries the whole state and SAM's group keys
        assert res["checkpoint_states"] == len(problem["params"])
        assert res["checkpoint_groups"] == [{"lr": LR, "rho": ref.RHO, "sam_eps": ref.EPS}]
        for a, b in zip(res["resumed"], res["zero_global"]["params"], strict=True):
            assert torch.equal(a, b)  # bit for bit
    assert "consolidate" in results[1]["unconsolidated_error"]
    assert "FSDP2" in results[0]["momentum_sam_error"]
