"""SAMTrainer under DDP: 2 gloo processes on CPU, gradient accumulation 2, against global SAM
computed in float64 from the micro-batches each rank was fed."""

from __future__ import annotations

import socket

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch.distributed as dist  # noqa: E402

from tests.integrations.test_transformers import BNNet  # noqa: E402

WORLD, ACCUMULATION, STEPS, LR, RHO = 2, 2, 2, 0.5, 0.5

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="needs torch.distributed gloo",
    ),
    pytest.mark.slow,  # two processes, each importing transformers: ~10 s
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gradient(model: torch.nn.Module, batches: list[list[dict]]) -> list[torch.Tensor]:
    """DDP's gradient: the mean over ranks of each rank's sum of micro-batch losses / k."""
    model.zero_grad()
    for rank_batches in batches:
        for b in rank_batches:
            (model(**b)["loss"] / ACCUMULATION / WORLD).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_ddp_with_accumulation_is_global_sam(tmp_path):
    import torch.multiprocessing as mp

    from tests.integrations._ddp_trainer_worker import worker

    mp.spawn(worker, args=(_free_port(), str(tmp_path), WORLD), nprocs=WORLD, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert all(len(r["calls"]) == STEPS * 2 * ACCUMULATION for r in runs)

    model = BNNet(batch_norm=False).double()
    model.load_state_dict(runs[0]["initial"])
    per_step = 2 * ACCUMULATION
    for step in range(STEPS):
        clean = [r["calls"][per_step * step : per_step * step + ACCUMULATION] for r in runs]
        perturbed = [r["calls"][per_step * step + ACCUMULATION : per_step * (step + 1)] for r in runs]
        for c_rank, p_rank in zip(clean, perturbed, strict=True):
            for c, p in zip(c_rank, p_rank, strict=True):
                assert all(torch.equal(c[k], p[k]) for k in c)  # the same micro-batches
        g = _gradient(model, clean)
        norm = torch.sqrt(sum((x * x).sum() for x in g))
        e = [RHO * x / (norm + 1e-12) for x in g]
        with torch.no_grad():
            for p, d in zip(model.parameters(), e, strict=True):
                p.add_(d)
        g_sam = _gradient(model, clean)
        lr = LR * (STEPS - step) / STEPS  # the Trainer's default linear decay
        with torch.no_grad():
            for p, d, gs in zip(model.parameters(), e, g_sam, strict=True):
                p.sub_(d)
                p.sub_(lr * gs)
    expected = dict(model.named_parameters())
    moved = max((runs[0]["initial"][n] - expected[n]).abs().max().item() for n in expected)
    assert moved > 0.05
    for run in runs:  # both ranks hold the same weights, global SAM's
        for name, value in run["final"].items():
            torch.testing.assert_close(value, expected[name].detach(), rtol=1e-12, atol=1e-12)
