"""One rank of the 2-process gloo run of SAMTrainer (spawned by test_transformers_ddp.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def worker(rank: int, port: int, out: str, world: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    import torch

    from sam_torch.integrations.transformers import SAMTrainer
    from tests.integrations.test_transformers import BNNet, VectorTask, make_args, params

    torch.set_num_threads(1)
    model = BNNet(batch_norm=False).double()
    initial = params(model)
    calls = []
    model.register_forward_pre_hook(
        lambda m, a, kw: calls.append({k: v.clone() for k, v in kw.items()}), with_kwargs=True
    )
    args = make_args(
        Path(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        optim="sgd", learning_rate=0.5, max_grad_norm=0.0, ddp_backend="gloo",
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=VectorTask(), sam_rho=0.5)
    trainer.train()
    torch.save(
        {"calls": calls, "initial": initial, "final": params(model)}, Path(out) / f"rank{rank}.pt"
    )


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
