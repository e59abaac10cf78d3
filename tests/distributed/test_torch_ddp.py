"""sam_torch on 2 gloo processes: DDP (global SAM and m-sharpness), FSDP2 and DTensor params.

Every run is compared with the float64 NumPy reference of :mod:`tests.distributed.reference`
(global SAM = single-process SAM on the concatenated batch; m-sharpness = the average of
the per-shard SAM gradients), and with single-process ``sam_torch.SAM`` on the full batch.
The processes are spawned once per session (conftest.py); the tests read the results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.distributed import reference as ref
from tests.distributed._torch_worker import MLP, WORLD, mse

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

RTOL, ATOL = 1e-12, 1e-13


@pytest.fixture(scope="module")
def results(torch_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return torch_results


def _close(actual: list[torch.Tensor], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a.numpy(), e, rtol=RTOL, atol=ATOL)


def _differs(actual: list[torch.Tensor], other: list[np.ndarray]) -> bool:
    return max(float(np.abs(a.numpy() - o).max()) for a, o in zip(actual, other, strict=True)) > 1e-6


GLOBAL = ["ddp_global", "ddp_global_copy", "ddp_global_bucket_view", "fsdp_global",
          "fsdp_global_foreach"]
M_SHARPNESS = ["ddp_m", "ddp_m_bucket_view"]


@pytest.mark.parametrize("name", [*GLOBAL, "ddp_global_asam", "fsdp_global_asam"])
def test_global_mode_is_full_batch_sam(results, problem, name) -> None:
    adaptive = name.endswith("asam")
    expected = ref.train(problem, world=WORLD, m_sharpness=False, adaptive=adaptive)
    m_expected = ref.train(problem, world=WORLD, m_sharpness=True, adaptive=adaptive)
    for rank, res in enumerate(results):
        r = res[name]
        _close(r["params"], expected["params"])
        assert _differs(r["params"], m_expected["params"])  # the two modes are distinguishable
        # Every rank perturbs to the same point with the global norm.
        _close(r["perturbed"], expected["first"]["perturbed"][rank])
        np.testing.assert_allclose(r["norms"], expected["norms"][:, rank], rtol=RTOL)
        _close(r["u"], expected["first"]["u"])


@pytest.mark.parametrize("name", [*M_SHARPNESS, "ddp_m_asam"])
def test_m_sharpness_is_mean_of_per_shard_sam_gradients(results, problem, name) -> None:
    adaptive = name.endswith("asam")
    expected = ref.train(problem, world=WORLD, m_sharpness=True, adaptive=adaptive)
    global_expected = ref.train(problem, world=WORLD, m_sharpness=False, adaptive=adaptive)
    for rank, res in enumerate(results):
        r = res[name]
        _close(r["params"], expected["params"])
        assert _differs(r["params"], global_expected["params"])
        # Each rank perturbs with its own shard's gradient and norm ...
        _close(r["perturbed"], expected["first"]["perturbed"][rank])
        np.testing.assert_allclose(r["norms"], expected["norms"][:, rank], rtol=RTOL)
        # ... and the perturbed-point gradients are averaged over the ranks.
        _close(r["u"], expected["first"]["u"])
    assert _differs(results[0][name]["perturbed"], expected["first"]["perturbed"][1])


def test_m_sharpness_with_step_closure(results, problem) -> None:
    expected = ref.train(problem, world=WORLD, m_sharpness=True)
    for res in results:
        _close(res["ddp_m_closure"]["params"], expected["params"])


def test_wrapping_only_backward_in_no_sync_is_global_sam(results, problem) -> None:
    """The mistake clean_pass avoids: DDP decides in forward() whether backward syncs."""
    expected = ref.train(problem, world=WORLD, m_sharpness=False)
    for res in results:
        _close(res["ddp_backward_only_no_sync"]["params"], expected["params"])


@pytest.mark.parametrize("name", GLOBAL + M_SHARPNESS + ["ddp_global_asam", "ddp_m_asam",
                                                         "fsdp_global_asam"])
def test_restore_is_bit_exact_and_keeps_gradients(results, name) -> None:
    for res in results:
        r = res[name]
        assert r["restored_exact"]
        for a, b in zip(r["u_after_restore"], r["u"], strict=True):
            assert torch.equal(a, b)


def test_storage_choice(results) -> None:
    """DDP params own their storage: SAM swaps them; DTensor (FSDP2) params are copied."""
    for res in results:
        assert res["ddp_global"]["swap"] and res["ddp_m"]["swap"]
        assert not res["ddp_global_copy"]["swap"]
        assert not res["fsdp_global"]["swap"]


def test_ranks_agree_bitwise(results) -> None:
    for name in GLOBAL + M_SHARPNESS:
        for a, b in zip(results[0][name]["params"], results[1][name]["params"], strict=True):
            assert torch.equal(a, b), name


def test_fsdp2_rejects_m_sharpness(results) -> None:
    for res in results:
        assert "not supported for FSDP2" in res["fsdp_global"]["m_sharpness_error"]


@pytest.mark.parametrize("impl", ["per_tensor", "foreach"])
@pytest.mark.parametrize("variant", ["sam", "asam"])
def test_dtensor_sharded_params_use_the_full_norm(results, problem, impl, variant) -> None:
    adaptive = variant == "asam"
    params = problem["params"]
    _, grads = ref.loss_and_grad(params, problem["xs"][0], problem["ys"][0])
    e, norm = ref.perturbation(params, grads, rho=ref.RHO, adaptive=adaptive)
    full_sq = sum(float(np.sum(g**2)) for g in grads)
    for res in results:
        r = res[f"dtensor_{impl}_{variant}"]
        assert r["local_shard_numel"] < params[0].size  # really sharded
        # TorchOps.sum_of_squares on sharded grads: the full sum, replicated on every rank.
        np.testing.assert_allclose(r["sq_norm"], full_sq, rtol=RTOL)
        assert "Replicate" in r["sq_norm_placements"]
        assert "Partial" in r["stack_of_norms"]  # stack keeps the pending reduction
        np.testing.assert_allclose(r["grad_norm"], norm, rtol=RTOL)
        _close(r["perturbed"], [w + ei for w, ei in zip(params, e, strict=True)])
        assert r["restored_exact"]


def _single_process_sam(problem: dict[str, Any], adaptive: bool) -> list[torch.Tensor]:
    """sam_torch.SAM in this process on the concatenated (full) batches."""
    from sam_torch import SAM

    model = MLP(problem["params"])
    sam = SAM(model.parameters(), torch.optim.SGD, lr=ref.LR, momentum=ref.MOMENTUM,
              rho=ref.RHO, adaptive=adaptive, eta=ref.ETA, sam_eps=ref.EPS)
    for x, y in zip(problem["xs"], problem["ys"], strict=True):
        x, y = torch.tensor(x), torch.tensor(y)
        mse(model(x), y).backward()
        sam.first_step(zero_grad=True)
        mse(model(x), y).backward()
        sam.second_step(zero_grad=True)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("adaptive", [False, True])
def test_reference_matches_single_process_sam_on_the_full_batch(problem, adaptive) -> None:
    expected = ref.train(problem, world=WORLD, m_sharpness=False, adaptive=adaptive)
    _close(_single_process_sam(problem, adaptive), expected["params"])


@pytest.mark.parametrize("name", ["ddp_global", "ddp_global_copy", "ddp_global_asam",
                                  "fsdp_global", "fsdp_global_asam"])
def test_two_process_global_sam_equals_single_process_sam(results, problem, name) -> None:
    """The issue's check: 2-process gloo run == one process on the concatenated batch."""
    single = _single_process_sam(problem, adaptive=name.endswith("asam"))
    for res in results:
        for a, b in zip(res[name]["params"], single, strict=True):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
