"""Train a WideResNet on CIFAR-10/100 with SGD, SAM or ASAM in PyTorch (CPU or GPU).

    python -m examples.train_torch --data-dir /path/to/data --optimizer sam   # WRN-16-8 defaults
    python -m examples.train_torch --data-dir /path/to/data --depth 10 --width 2 --epochs 3 \\
        --limit-train 5000 --optimizer sgd --out runs/torch_sgd            # a few CPU minutes

``--data-dir`` holds CIFAR in the official layout (https://www.cs.toronto.edu/~kriz/cifar.html,
the tarball or its extracted folder); ``--download`` fetches and checks it there.

The flags are those of ``train_jax.py`` (:func:`examples.cli.build_parser`) and the batches
are the same (:mod:`examples.data`). The SAM step is the two-pass loop of ``sam_torch``:
clean forward/backward (which alone updates the BatchNorm running statistics),
``first_step``, perturbed forward/backward under ``disable_running_stats``, ``second_step``.
Each epoch writes ``metrics.csv``/``metrics.json`` and ``checkpoint.pt`` in ``--out``;
``--resume`` continues from the checkpoint exactly (the epoch's shuffle and augmentation are
a pure function of ``(seed, epoch)``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python examples/train_torch.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from tqdm import tqdm

import sam_torch
from examples.cli import lr_at, parse_args, write_metrics
from examples.data import Split, batches, epoch_rng, load_cifar, to_nchw
from examples.optimizers import make_torch_optimizer
from examples.wrn_torch import WideResNet

__all__ = ["evaluate", "main"]

CHECKPOINT = "checkpoint.pt"


def evaluate(
    model: torch.nn.Module, split: Split, args: Any, device: torch.device
) -> tuple[float, float]:
    """``(mean label-smoothed loss, accuracy)`` of ``model`` in eval mode on ``split``."""
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in batches(split, args.eval_batch_size, dataset=args.dataset):
            xt = torch.from_numpy(to_nchw(x)).to(device)
            yt = torch.from_numpy(y).to(device)
            logits = model(xt)
            loss = F.cross_entropy(logits, yt, label_smoothing=args.label_smoothing)
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == yt).sum())
    return total_loss / len(split), correct / len(split)


def _limit(split: Split, n: int | None) -> Split:
    return split if n is None else Split(split.images[:n], split.labels[:n])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run training; return the last epoch's metrics."""
    args = parse_args("Train a WideResNet on CIFAR with sam_torch.", argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, test, num_classes = load_cifar(args.data_dir, args.dataset, download=args.download)
    train, test = _limit(train, args.limit_train), _limit(test, args.limit_test)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)

    torch.manual_seed(args.seed)
    model = WideResNet(args.depth, args.width, num_classes).to(device)
    optimizer = make_torch_optimizer(args.optimizer, model, args)
    two_pass = hasattr(optimizer, "first_step")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_epoch, history = 0, []
    if args.resume is not None:
        path = out / CHECKPOINT if args.resume == "auto" else Path(args.resume)
        if path.is_file():
            ckpt = torch.load(path, map_location=device, weights_only=False)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, history = ckpt["epoch"], ckpt["history"]
            print(f"resumed from {path} at epoch {start_epoch}")
        elif args.resume != "auto":
            raise SystemExit(f"--resume {path}: no such checkpoint file")

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)

    for epoch in range(start_epoch, args.epochs):
        model.train()
        started = time.perf_counter()
        seen, loss_sum, correct, sharp_sum, sharp_seen = 0, 0.0, 0, 0.0, 0
        bar = tqdm(
            batches(
                train,
                args.batch_size,
                dataset=args.dataset,
                rng=epoch_rng(args.seed, epoch),
                train=True,
            ),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=args.no_progress,
            leave=False,
        )
        for i, (x, y) in enumerate(bar):
            lr = lr_at(
                epoch * steps_per_epoch + i,
                lr=args.lr,
                schedule=args.schedule,
                epochs=args.epochs,
                steps_per_epoch=steps_per_epoch,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            xt = torch.from_numpy(to_nchw(x)).to(device)
            yt = torch.from_numpy(y).to(device)
            logits = model(xt)
            loss = loss_fn(logits, yt)
            loss.backward()
            # LookSAM / every-k SAM: one pass on the steps that reuse or skip SAM's
            if two_pass and getattr(optimizer, "is_full_step", True):
                optimizer.first_step(zero_grad=True)
                with sam_torch.disable_running_stats(model):
                    perturbed_loss = loss_fn(model(xt), yt)
                    perturbed_loss.backward()
                optimizer.second_step(zero_grad=True)
                sharp_sum += (perturbed_loss.item() - loss.item()) * len(y)
                sharp_seen += len(y)
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == yt).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        test_loss, test_acc = evaluate(model, test, args, device)
        history.append(
            {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "sharpness": sharp_sum / sharp_seen if two_pass and sharp_seen else None,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "epoch_time_s": round(time.perf_counter() - started, 3),
            }
        )
        print(
            f"epoch {epoch + 1}/{args.epochs} train loss {loss_sum / seen:.4f} acc "
            f"{correct / seen:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f}"
        )
        write_metrics(out, history, args)
        tmp = out / (CHECKPOINT + ".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "args": vars(args),
            },
            tmp,
        )
        os.replace(tmp, out / CHECKPOINT)
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch:
            print(f"stopping after epoch {epoch + 1} (--stop-after-epoch)")
            return history[-1]
    final = history[-1] if history else {}
    if final:
        print(
            f"final test accuracy {final['test_acc']:.4f} "
            f"(error {100 * (1 - final['test_acc']):.2f}%)"
        )
    return final


if __name__ == "__main__":
    main()
