"""Data-parallel SAM with ``torchrun``: DDP (global SAM or m-sharpness) or FSDP2 (global SAM).

Launch on one machine with two processes (CPU/gloo or one GPU per process/NCCL)::

    torchrun --nproc-per-node 2 examples/train_torch_ddp.py --steps 50
    torchrun --nproc-per-node 2 examples/train_torch_ddp.py --m-sharpness --steps 50
    torchrun --nproc-per-node 2 examples/train_torch_ddp.py --fsdp --adaptive --rho 0.5
    torchrun --nproc-per-node 2 examples/train_torch_ddp.py --model wrn   # WRN-16-8

    torchrun --nproc-per-node 2 examples/train_torch_ddp.py --model wrn --data-dir /path/to/data

Without ``--data-dir`` the data is synthetic and CIFAR-shaped (32x32x3, 10 classes) so the
script runs anywhere; with it, CIFAR-10 is read by the shared pipeline (:mod:`examples.data`):
every rank draws the same shuffled, augmented global batch and keeps its slice.
``--batch-size`` is per process, so the global batch is ``batch_size * world_size`` and with
``--m-sharpness`` each replica's perturbation uses its own ``batch_size`` samples. See
docs/distributed.md for the two modes.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # `torchrun examples/train_torch_ddp.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sam_torch import SAM, clean_pass, disable_running_stats


def small_convnet(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


def build_model(name: str) -> nn.Module:
    if name == "wrn":  # the WideResNet of the main example (examples/wrn_torch.py)
        from examples.wrn_torch import WideResNet

        return WideResNet(depth=16, width=8, num_classes=10)
    return small_convnet()


def synthetic_batch(step: int, rank: int, batch_size: int, device: torch.device) -> tuple:
    """This rank's shard of the global batch of ``step`` (seeded, so runs are repeatable)."""
    gen = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    return x.to(device), y.to(device)


def cifar_batches(data_dir: str, steps: int, rank: int, world: int, batch_size: int,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's slice of each CIFAR-10 global batch (same shuffle on every rank)."""
    from examples.data import batches, epoch_rng, load_cifar, to_nchw

    train, _, _ = load_cifar(data_dir, "cifar10")
    step, epoch = 0, 0
    while True:
        for x, y in batches(train, batch_size * world, rng=epoch_rng(0, epoch), train=True):
            if len(y) < batch_size * world:  # equal shards only: skip the ragged last batch
                continue
            if step == steps:
                return
            part = slice(rank * batch_size, (rank + 1) * batch_size)
            yield (torch.from_numpy(to_nchw(x[part])).to(device),
                   torch.from_numpy(y[part]).to(device))
            step += 1
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "wrn"], default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: synthetic)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--adaptive", action="store_true", help="ASAM")
    parser.add_argument("--m-sharpness", action="store_true",
                        help="perturb each replica with its local gradient (DDP only)")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard (global SAM)")
    args = parser.parse_args()
    if args.fsdp and args.m_sharpness:
        parser.error("--m-sharpness needs DDP: FSDP2 never holds a rank's local full gradient")

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    model = build_model(args.model).to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.modules():  # shard each conv/linear, then the root
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fully_shard(layer)
        fully_shard(model)
    else:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if use_cuda else model
        model = nn.parallel.DistributedDataParallel(model)

    # Storage is chosen automatically: swap for DDP's plain parameters, copy for FSDP2's DTensors.
    sam = SAM(model.parameters(), torch.optim.SGD, lr=args.lr, momentum=0.9, weight_decay=5e-4,
              rho=args.rho, adaptive=args.adaptive)
    model.train()
    if args.data_dir is None:
        data = (synthetic_batch(step, rank, args.batch_size, device) for step in range(args.steps))
    else:
        data = cifar_batches(args.data_dir, args.steps, rank, world, args.batch_size, device)
    for step, (x, y) in enumerate(data):
        # Clean forward AND backward in clean_pass: under m-sharpness they run in no_sync().
        with clean_pass(model, m_sharpness=args.m_sharpness):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        sam.first_step(zero_grad=True)  # zero_grad=True: the next all-reduce sees only g(w+e)
        with disable_running_stats(model):
            F.cross_entropy(model(x), y).backward()  # always all-reduced
        sam.second_step(zero_grad=True)

        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {mean_loss.item() / world:.4f}  "
                  f"grad_norm {float(sam.grad_norm):.4f}", flush=True)

    # Every rank must end with the same weights: print a checksum per rank.
    with torch.no_grad():
        total = sum(
            (p.full_tensor() if hasattr(p, "full_tensor") else p).double().sum()
            for p in model.parameters()
        )
    print(f"rank {rank} checksum {float(total):.12e}", flush=True)
    # Free the model (FSDP2 keeps the last collectives' work handles) before tearing down
    # the group, and let no rank tear it down while another still uses it. gc.collect(): an
    # object kept alive by a reference cycle would otherwise be freed only at interpreter
    # exit, after the group is gone, which can abort the process ("terminate called").
    del model, sam
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
