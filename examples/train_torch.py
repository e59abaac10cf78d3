"""Train with SGD, SAM, ASAM or a SAM variant in PyTorch (CPU or GPU): a WideResNet on
CIFAR-10/100, or a small CNN on scikit-learn's digits; optionally with label noise and
m-sharpness.

    python -m examples.train_torch --data-dir DATA --optimizer sam   # WRN-16-8 defaults
    python -m examples.train_torch --data-dir DATA --depth 10 --width 2 --epochs 3 \\
        --limit-train 5000 --optimizer sgd --out runs/torch_sgd    # a few CPU minutes
    python -m examples.train_torch --dataset digits --epochs 40 --schedule cosine --lr 0.05 \\
        --label-smoothing 0 --label-noise 0.4 --optimizer sam --m-sharpness 16 --out runs/d

``--data-dir`` holds CIFAR in the official layout (https://www.cs.toronto.edu/~kriz/cifar.html,
the tarball or its extracted folder); ``--download`` fetches and checks it there.

The flags are those of ``train_jax.py`` (:func:`examples.cli.build_parser`) and the batches
are the same (:mod:`examples.data`). The SAM step is the two-pass loop of ``sam_torch``:
clean forward/backward (which alone updates the BatchNorm running statistics),
``first_step``, perturbed forward/backward under ``disable_running_stats``, ``second_step``;
with ``--m-sharpness M`` it is :func:`sam_torch.m_sharpness_step` (each chunk of M examples
perturbed with its own gradient).

:func:`train` is the training loop as a function (``train(config) -> history``), called by
:func:`main`, the benchmarks and the label-noise study (:func:`train_model` also returns the
trained model); with ``config.out`` set, each epoch
writes ``metrics.csv``/``metrics.json`` and ``checkpoint.pt`` there, and ``--resume``
continues from the checkpoint exactly (the epoch's shuffle and augmentation are a pure
function of ``(seed, epoch)``).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python examples/train_torch.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import sam_core
import sam_torch
from examples.calibration import expected_calibration_error
from examples.cli import (
    check_chunks,
    end_epoch,
    lr_at,
    parse_args,
    print_epoch,
    rho_warmup_steps,
)
from examples.data import (
    Split,
    TrainingData,
    batches,
    epoch_rng,
    fit_metrics,
    load_training_data,
    to_nchw,
)
from examples.optimizers import check_m_sharpness, make_torch_optimizer
from examples.trajectory import TRAJECTORY_FORMS, indexed_batches, torch_trajectory_term

__all__ = ["build_model", "evaluate", "main", "predict", "train", "train_model"]

CHECKPOINT = "checkpoint.pt"


def build_model(config: Any, data: TrainingData) -> torch.nn.Module:
    """The digits CNN (:class:`examples.cnn_torch.SmallCNN`, NumPy-seeded) or a
    WideResNet (``config.depth``/``config.width``, seeded with ``torch.manual_seed``)."""
    if data.name == "digits":
        from examples.cnn_torch import SmallCNN

        _, h, _, c = data.train.images.shape
        return SmallCNN(config.seed, c, data.num_classes, h)
    from examples.wrn_torch import WideResNet

    torch.manual_seed(config.seed)
    return WideResNet(config.depth, config.width, data.num_classes)


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


def predict(model: torch.nn.Module, split: Split, args: Any, device: torch.device) -> np.ndarray:
    """Eval-mode class predictions for ``split`` in order."""
    model.eval()
    out = []
    with torch.no_grad():
        for x, _ in batches(split, args.eval_batch_size, dataset=args.dataset):
            out.append(model(torch.from_numpy(to_nchw(x)).to(device)).argmax(1).cpu().numpy())
    return np.concatenate(out)


#: Posterior samples BSAM's predictive averages for the final calibration.
BSAM_SAMPLES = 8


def calibration(
    model: torch.nn.Module, optimizer: Any, split: Split, args: Any, device: torch.device
) -> dict[str, float]:
    """``test_ece`` (:func:`examples.calibration.expected_calibration_error`) and the accuracy
    of the same probabilities: the softmax of the model, or BSAM's predictive (softmax
    averaged over :data:`BSAM_SAMPLES` posterior samples, the same samples for every batch)."""
    model.eval()
    probs = []
    with torch.no_grad():
        for x, _ in batches(split, args.eval_batch_size, dataset=args.dataset):
            xt = torch.from_numpy(to_nchw(x)).to(device)
            if isinstance(optimizer, sam_torch.BSAM):
                p = sam_torch.predictive(model, optimizer, xt, samples=BSAM_SAMPLES, seed=args.seed)
            else:
                p = model(xt).softmax(-1)
            probs.append(p.double().cpu().numpy())
    stacked = np.concatenate(probs)
    return {
        "test_ece": expected_calibration_error(stacked, split.labels),
        "test_acc_calibrated": float((stacked.argmax(1) == split.labels).mean()),
    }


def train(
    config: Any, progress: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Train as ``config`` (the scripts' arguments, :func:`examples.cli.make_config`) says
    and return the history (:func:`train_model` without the model)."""
    return train_model(config, progress)[0]


def train_model(
    config: Any, progress: Callable[[dict[str, Any]], None] | None = None
) -> tuple[list[dict[str, Any]], torch.nn.Module]:
    """Train as ``config`` (the scripts' arguments, :func:`examples.cli.make_config`) says;
    return ``(history, model)``, the model as trained (for analyses such as a loss
    landscape).

    Returns the history: one dict per epoch with ``epoch``, ``lr``, ``train_loss``,
    ``train_acc`` (running, on the augmented batches; ``None`` with m-sharpness, whose step
    returns the loss only), ``sharpness`` (mean :math:`L(w+e) - L(w)`, ``None`` for
    one-pass optimizers), ``test_loss``, ``test_acc``, ``noisy_fit`` and ``clean_fit``
    (:func:`examples.data.fit_metrics`, eval mode on the training set; only with label
    noise, else ``None``), ``epoch_time_s``, ``passes`` (forward-backward passes over a
    batch in the epoch: 2 on a SAM or BSAM step, 1 on an SGD, Momentum-SAM, LookSAM /
    every-k reuse or AE-SAM plain step, 1 + k/B on an ESAM step, whose perturbed backward
    is on its k selected examples of the B and whose selection forward at w + e is not
    counted here but in ``forwards_per_step``; SAF 1; MESA 1, its EMA forward in
    ``forwards_per_step``) and ``passes_per_step``; ``forwards_per_step`` (forwards over a
    batch without backward per step, not in ``passes``: ESAM's selection forward at w + e,
    1 per step; MESA's forward with the EMA weights, 1 per step on the epochs with its term,
    0 before; 0 for the other forms; a forward alone costs roughly a third of a pass);
    ``trajectory_loss`` (SAF / MESA: the mean trajectory term added to the loss, 0 before
    its start epoch; ``None`` for the other forms; ``train_loss`` is the cross-entropy
    alone). SAF and MESA train on :func:`examples.trajectory.indexed_batches` (the same
    batches with their indices). Momentum-SAM's one pass is at :math:`w + e`, so its
    ``train_loss`` and ``train_acc`` are those of the perturbed point. ``progress(metrics)`` is called after each
    epoch. Files are written only when ``config.out`` is set.
    """
    check_m_sharpness(config.optimizer, getattr(config, "m_sharpness", None))
    if getattr(config, "threads", None):
        torch.set_num_threads(config.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_training_data(config)
    train_split = data.train
    m = getattr(config, "m_sharpness", None)
    check_chunks(config, len(train_split))
    steps_per_epoch = math.ceil(len(train_split) / config.batch_size)
    augment = data.name != "digits" and not getattr(config, "no_augment", False)
    noisy = bool(data.flipped.any())
    impl = getattr(config, "m_sharpness_impl", "auto")
    vectorize: bool | str = {"auto": "auto", "loop": False, "vectorized": True}[impl]

    model = build_model(config, data).to(device)
    opt_config = copy.copy(config)
    opt_config.num_data = len(train_split)  # BSAM's posterior needs it
    opt_config.total_steps = config.epochs * steps_per_epoch  # AE-SAM's schedule of c
    optimizer = make_torch_optimizer(config.optimizer, model, opt_config)
    two_pass = hasattr(optimizer, "first_step")
    one_pass = isinstance(optimizer, sam_torch.MomentumSAM) and m is None
    trajectory = config.optimizer in TRAJECTORY_FORMS
    rho_warmup = rho_warmup_steps(config, steps_per_epoch)
    if m is not None and not two_pass:
        raise ValueError(f"m_sharpness needs a SAM-family optimizer, got {config.optimizer!r}")

    out = Path(config.out) if getattr(config, "out", None) else None
    start_epoch, history = 0, []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    resume = getattr(config, "resume", None)
    if resume is not None:
        if out is None and resume == "auto":
            raise ValueError("resume='auto' needs config.out (the folder of the checkpoint)")
        path = out / CHECKPOINT if resume == "auto" else Path(resume)
        if path.is_file():
            ckpt = torch.load(path, map_location=device, weights_only=False)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, history = ckpt["epoch"], ckpt["history"]
            print(f"resumed from {path} at epoch {start_epoch}")
        elif resume != "auto":
            raise SystemExit(f"--resume {path}: no such checkpoint file")

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)

    def chunk_loss(net: torch.nn.Module, chunk: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return loss_fn(net(chunk[0]), chunk[1])

    def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits, labels, label_smoothing=config.label_smoothing, reduction="none"
        )

    for epoch in range(start_epoch, config.epochs):
        model.train()
        started = time.perf_counter()
        seen, loss_sum, correct, sharp_sum, sharp_seen = 0, 0.0, 0, 0.0, 0
        passes, steps = 0, 0  # forward-backward passes over a batch, optimizer steps
        forwards = 0  # forwards over a batch without backward (MESA's EMA, ESAM's selection)
        term_sum = 0.0  # SAF / MESA: the trajectory term, summed over the examples
        if trajectory:  # the same batches with their indices into the training set
            stream: Any = indexed_batches(
                train_split, config.batch_size, seed=config.seed, epoch=epoch,
                dataset=config.dataset, augment=augment,
            )
        else:
            stream = batches(
                train_split,
                config.batch_size,
                dataset=config.dataset,
                rng=epoch_rng(config.seed, epoch),
                train=True,
                augment=augment,
            )
        bar = tqdm(
            stream,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=getattr(config, "no_progress", True),
            leave=False,
        )
        for i, batch in enumerate(bar):
            x, y = batch[0], batch[1]
            lr = lr_at(
                epoch * steps_per_epoch + i,
                lr=config.lr,
                schedule=config.schedule,
                epochs=config.epochs,
                steps_per_epoch=steps_per_epoch,
            )
            rho = (
                sam_core.rho_warmup(
                    epoch * steps_per_epoch + i, rho=config.rho, warmup_steps=rho_warmup
                )
                if rho_warmup
                else None
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
                if rho is not None:
                    group["rho"] = rho
            xt = torch.from_numpy(to_nchw(x)).to(device)
            yt = torch.from_numpy(y).to(device)
            if isinstance(optimizer, sam_torch.BSAM):  # both passes through step(closure)
                seen_logits: list[torch.Tensor] = []

                def closure(
                    xt: torch.Tensor = xt, yt: torch.Tensor = yt, seen_logits: list = seen_logits
                ) -> torch.Tensor:
                    out = model(xt)
                    seen_logits.append(out.detach())  # the first: at the posterior sample
                    batch_loss = loss_fn(out, yt)
                    batch_loss.backward()
                    return batch_loss

                loss = optimizer.step(closure)
                passes += 2  # at the posterior sample and at the perturbed mean
                correct += int((seen_logits[0].argmax(1) == yt).sum())
            elif isinstance(optimizer, sam_torch.ESAM) and m is None:
                # the per-example loss contract: closure(index=None) returns the losses of
                # the batch (or of batch[index]) without backward(); ESAM makes the clean
                # pass, a forward at w + e, and the backward on the selected examples
                clean_logits: list[torch.Tensor] = []

                def closure(
                    index: torch.Tensor | None = None, xt: torch.Tensor = xt,
                    yt: torch.Tensor = yt, clean_logits: list = clean_logits,
                ) -> torch.Tensor:
                    xs, ys = (xt, yt) if index is None else (xt[index], yt[index])
                    out = model(xs)
                    if not clean_logits:
                        clean_logits.append(out.detach())  # the first call: at w
                    return per_example_loss(out, ys)

                loss = optimizer.step(closure)
                optimizer.zero_grad(set_to_none=True)
                chosen = len(y) if optimizer.selected is None else len(optimizer.selected)
                # forward-backward over the batch at w and over the selected examples at
                # w + e (the selection's forward at w + e has no backward: not counted)
                passes += 1 + chosen / len(y)
                forwards += 1
                if optimizer.perturbed_loss is not None:
                    sharp_sum += float(optimizer.perturbed_loss - loss) * len(y)
                    sharp_seen += len(y)
                correct += int((clean_logits[0].argmax(1) == yt).sum())
            elif m is not None:
                loss = sam_torch.m_sharpness_step(
                    optimizer, model, chunk_loss, (xt, yt), m=m, vectorize=vectorize
                )
                optimizer.zero_grad(set_to_none=True)
                sharp_sum += float(optimizer.sharpness) * len(y)
                sharp_seen += len(y)
                passes += 2  # every chunk's clean and perturbed pass: two batches' worth
                correct = None
            elif one_pass:  # Momentum-SAM: its only pass is at w + e (no clean gradient)
                outputs: list[torch.Tensor] = []

                def closure(
                    xt: torch.Tensor = xt, yt: torch.Tensor = yt, outputs: list = outputs
                ) -> torch.Tensor:
                    outputs.append(model(xt))
                    perturbed = loss_fn(outputs[-1], yt)
                    perturbed.backward()
                    return perturbed

                loss = optimizer.step(closure)
                optimizer.zero_grad(set_to_none=True)
                passes += 1
                correct += int((outputs[-1].argmax(1) == yt).sum())
            elif trajectory:  # SAF / MESA: one forward-backward of CE + the trajectory term
                logits = model(xt)
                loss = loss_fn(logits, yt)
                # MESA: its EMA forward (eval mode, no backward) only on the epochs with the term
                term = torch_trajectory_term(optimizer, model, logits, xt, batch[2], epoch)
                (loss + term).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                passes += 1
                forwards += int(isinstance(optimizer, sam_torch.MESA) and optimizer.active(epoch))
                term_sum += float(term.detach()) * len(y)
                correct += int((logits.argmax(1) == yt).sum())
            else:
                logits = model(xt)
                loss = loss_fn(logits, yt)
                loss.backward()
                passes += 1
                # LookSAM / every-k SAM: one pass on the steps that reuse or skip SAM's
                if two_pass and getattr(optimizer, "is_full_step", True):
                    # AE-SAM decides in first_step from the clean gradient (one host read)
                    # and perturbs on a SAM step only; its plain step is second_step with
                    # the clean gradient, so that one is kept
                    decides = isinstance(optimizer, sam_torch.AESAM)
                    optimizer.first_step(zero_grad=not decides)
                    if not decides or optimizer.is_perturbed:
                        if decides:
                            optimizer.zero_grad(set_to_none=True)
                        with sam_torch.disable_running_stats(model):
                            perturbed_loss = loss_fn(model(xt), yt)
                            perturbed_loss.backward()
                        passes += 1
                        sharp_sum += (perturbed_loss.item() - loss.item()) * len(y)
                        sharp_seen += len(y)
                    optimizer.second_step(zero_grad=True)
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                correct += int((logits.argmax(1) == yt).sum())
            steps += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        test_loss, test_acc = evaluate(model, data.test, config, device)
        fit: dict[str, float | None] = {"noisy_fit": None, "clean_fit": None}
        if noisy:
            fit = fit_metrics(predict(model, train_split, config, device), data)
        metrics = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / seen,
            "train_acc": None if correct is None else correct / seen,
            "sharpness": sharp_sum / sharp_seen if two_pass and sharp_seen else None,
            "test_loss": test_loss,
            "test_acc": test_acc,
            **fit,
            "epoch_time_s": round(time.perf_counter() - started, 3),
            "passes": passes,
            "passes_per_step": passes / steps,
            "forwards_per_step": forwards / steps,
            "trajectory_loss": term_sum / seen if trajectory else None,
            "test_ece": None,  # the final epoch's: the final model's calibration
            "test_acc_calibrated": None,
        }
        if epoch + 1 == config.epochs:  # BSAM: from its predictive
            metrics.update(calibration(model, optimizer, data.test, config, device))
        if end_epoch(
            history, metrics, config, progress=progress, out=out, checkpoint=CHECKPOINT,
            save=lambda path, epoch=epoch: torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "args": vars(config),
                },
                path,
            ),
        ):
            break
    return history, model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run training from the command line; return the last epoch's metrics."""
    args = parse_args("Train with sam_torch (WideResNet on CIFAR, small CNN on digits).", argv)
    history = train(args, progress=lambda m: print_epoch(m, args.epochs))
    final = history[-1] if history else {}
    if final and (args.stop_after_epoch is None or final["epoch"] >= args.epochs):
        print(
            f"final test accuracy {final['test_acc']:.4f} "
            f"(error {100 * (1 - final['test_acc']):.2f}%)"
        )
    return final


if __name__ == "__main__":
    main()
