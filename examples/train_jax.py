"""Train a WideResNet on CIFAR-10/100 with SGD, SAM or ASAM in JAX/Flax (CPU or GPU).

    python -m examples.train_jax --data-dir /path/to/data --optimizer sam   # WRN-16-8 defaults
    python -m examples.train_jax --data-dir /path/to/data --depth 10 --width 2 --epochs 3 \\
        --limit-train 5000 --optimizer sgd --out runs/jax_sgd              # a few CPU minutes

``--data-dir`` holds CIFAR in the official layout (https://www.cs.toronto.edu/~kriz/cifar.html,
the tarball or its extracted folder); ``--download`` fetches and checks it there.

The flags are those of ``train_torch.py`` (:func:`examples.cli.build_parser`) and the batches
are the same (:mod:`examples.data`). The optimizer is an optax chain,
``sam_jax.sam -> add_decayed_weights -> sgd`` for SAM/ASAM; its ``update`` gets a ``grad_fn``
that evaluates the loss and gradient at the perturbed parameters with
``mutable=["batch_stats"]`` and **discards** the statistics it computes, so the BatchNorm
running averages come from the clean pass only. Each epoch writes ``metrics.csv``/
``metrics.json`` and ``checkpoint.pkl`` in ``--out``; ``--resume`` continues exactly.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # `python examples/train_jax.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm import tqdm

from examples.cli import lr_at, parse_args, write_metrics
from examples.data import Split, batches, epoch_rng, load_cifar
from examples.optimizers import OPTAX_OPTIMIZERS, make_optax
from examples.wrn_flax import WideResNet

__all__ = ["TrainState", "main", "make_steps"]

CHECKPOINT = "checkpoint.pkl"


class TrainState(NamedTuple):
    """Everything a step changes: parameters, BatchNorm statistics, optimizer state."""

    params: Any
    batch_stats: Any
    opt_state: Any


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    r"""Mean of :math:`-\sum_k q_k \log p_k` with :math:`q = (1 - s)\,\mathrm{onehot} + s / K`
    (``torch.nn.functional.cross_entropy(..., label_smoothing=s)``)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


@functools.lru_cache(maxsize=8)
def make_steps(config: tuple[tuple[str, Any], ...], steps_per_epoch: int) -> tuple[Any, ...]:
    """``(model, tx, train_step, eval_step)`` for a hashable ``config`` (the arguments),
    cached so that resuming in the same process reuses the compiled steps."""
    args = _Args(dict(config))
    model = WideResNet(args.depth, args.width, args.num_classes)
    tx = make_optax(args.optimizer, args, steps_per_epoch)
    needs_grad_fn = OPTAX_OPTIMIZERS[args.optimizer].needs_grad_fn

    def loss_fn(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> Any:
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = smoothed_cross_entropy(logits, y, args.label_smoothing)
        return loss, (logits, new_vars["batch_stats"])

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    @functools.partial(jax.jit, static_argnames="full_step")
    def train_step(
        state: TrainState, x: jax.Array, y: jax.Array, full_step: bool | None = None
    ) -> tuple[TrainState, Any]:
        (loss, (logits, new_stats)), grads = value_and_grad(state.params, state.batch_stats, x, y)
        if needs_grad_fn:

            def grad_fn(perturbed: Any) -> tuple[jax.Array, Any]:
                # Batch statistics of w + e normalize this pass; their update is discarded.
                (p_loss, _), p_grads = value_and_grad(perturbed, state.batch_stats, x, y)
                return p_loss, p_grads

            extra = {} if full_step is None else {"full_step": full_step}
            updates, opt_state = tx.update(
                grads, state.opt_state, state.params, grad_fn=grad_fn, value=loss, **extra
            )
            sharpness = opt_state[0].sharpness
        else:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            sharpness = jnp.float32(jnp.nan)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return TrainState(params, new_stats, opt_state), (loss, correct, sharpness)

    eval_variables = _eval_fn(args.depth, args.width, args.num_classes, args.label_smoothing)

    def eval_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        return eval_variables(state.params, state.batch_stats, x, y)

    return model, tx, train_step, eval_step


@functools.lru_cache(maxsize=4)
def _eval_fn(depth: int, width: int, num_classes: int, label_smoothing: float) -> Any:
    """Jitted ``(params, batch_stats, x, y) -> (summed loss, correct)`` in eval mode, shared
    by every optimizer (it does not see the optimizer state)."""
    model = WideResNet(depth, width, num_classes)

    @jax.jit
    def eval_step(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> Any:
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        loss = smoothed_cross_entropy(logits, y, label_smoothing)
        return loss * len(y), jnp.sum(jnp.argmax(logits, -1) == y)

    return eval_step


@functools.lru_cache(maxsize=4)
def _init_fn(depth: int, width: int, num_classes: int) -> Any:
    """Jitted ``model.init`` (compiled once per architecture and process)."""
    model = WideResNet(depth, width, num_classes)
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))


class _Args:
    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


_STEP_KEYS = (
    "depth",
    "width",
    "num_classes",
    "optimizer",
    "rho",
    "eta",
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "schedule",
    "epochs",
    "label_smoothing",
)


def evaluate(eval_step: Any, state: TrainState, split: Split, args: Any) -> tuple[float, float]:
    """``(mean label-smoothed loss, accuracy)`` in eval mode (running statistics)."""
    loss_sum, correct = 0.0, 0
    for x, y in batches(split, args.eval_batch_size, dataset=args.dataset):
        batch_loss, batch_correct = eval_step(state, jnp.asarray(x), jnp.asarray(y))
        loss_sum += float(batch_loss)
        correct += int(batch_correct)
    return loss_sum / len(split), correct / len(split)


def _limit(split: Split, n: int | None) -> Split:
    return split if n is None else Split(split.images[:n], split.labels[:n])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run training; return the last epoch's metrics."""
    args = parse_args("Train a WideResNet on CIFAR with sam_jax (Flax).", argv)
    train, test, num_classes = load_cifar(args.data_dir, args.dataset, download=args.download)
    train, test = _limit(train, args.limit_train), _limit(test, args.limit_test)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    config = {k: getattr(args, k, None) for k in _STEP_KEYS}
    config["num_classes"] = num_classes
    _, tx, train_step, eval_step = make_steps(tuple(sorted(config.items())), steps_per_epoch)

    variables = _init_fn(args.depth, args.width, num_classes)(jax.random.key(args.seed))
    state = TrainState(variables["params"], variables["batch_stats"], None)
    state = state._replace(opt_state=tx.init(state.params))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_epoch, history = 0, []
    if args.resume is not None:
        path = out / CHECKPOINT if args.resume == "auto" else Path(args.resume)
        if path.is_file():
            with open(path, "rb") as f:  # our own file: pickle of NumPy arrays and lists
                ckpt = pickle.load(f)
            state = serialization.from_state_dict(state, ckpt["state"])
            start_epoch, history = ckpt["epoch"], ckpt["history"]
            print(f"resumed from {path} at epoch {start_epoch}")
        elif args.resume != "auto":
            raise SystemExit(f"--resume {path}: no such checkpoint file")

    two_pass = OPTAX_OPTIMIZERS[args.optimizer].needs_grad_fn
    full_step_at = OPTAX_OPTIMIZERS[args.optimizer].full_step
    for epoch in range(start_epoch, args.epochs):
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
            t = epoch * steps_per_epoch + i
            full_step = None if full_step_at is None else full_step_at(t)
            state, (loss, batch_correct, sharpness) = train_step(
                state, jnp.asarray(x), jnp.asarray(y), full_step
            )
            seen += len(y)
            loss_sum += float(loss) * len(y)
            correct += int(batch_correct)
            if math.isfinite(float(sharpness)):  # one-pass steps measure no sharpness
                sharp_sum += float(sharpness) * len(y)
                sharp_seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        test_loss, test_acc = evaluate(eval_step, state, test, args)
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
        with open(tmp, "wb") as f:
            pickle.dump(
                {
                    "state": serialization.to_state_dict(jax.device_get(state)),
                    "epoch": epoch + 1,
                    "history": history,
                    "args": vars(args),
                },
                f,
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


def params_of(state: TrainState) -> Any:
    """NumPy copy of the parameters (for tests and conversions)."""
    return jax.tree.map(np.asarray, state.params)


if __name__ == "__main__":
    main()
