"""Train with SGD, SAM, ASAM or a SAM variant in JAX/Flax (CPU or GPU): a WideResNet on
CIFAR-10/100, or a small CNN on scikit-learn's digits; optionally with label noise and
m-sharpness.

    python -m examples.train_jax --data-dir DATA --optimizer sam   # WRN-16-8 defaults
    python -m examples.train_jax --data-dir DATA --depth 10 --width 2 --epochs 3 \\
        --limit-train 5000 --optimizer sgd --out runs/jax_sgd     # a few CPU minutes
    python -m examples.train_jax --dataset digits --epochs 40 --schedule cosine --lr 0.05 \\
        --label-smoothing 0 --label-noise 0.4 --optimizer sam --m-sharpness 16 --out runs/d

``--data-dir`` holds CIFAR in the official layout (https://www.cs.toronto.edu/~kriz/cifar.html,
the tarball or its extracted folder); ``--download`` fetches and checks it there.

The flags are those of ``train_torch.py`` (:func:`examples.cli.build_parser`) and the batches
are the same (:mod:`examples.data`); the digits CNN starts from the same weights as the
PyTorch one (:func:`examples.cnn_flax.init_variables`). The optimizer is an optax chain,
``sam_jax.sam -> add_decayed_weights -> sgd`` for SAM/ASAM; its ``update`` gets a ``grad_fn``
that evaluates the loss and gradient at the perturbed parameters with
``mutable=["batch_stats"]`` and **discards** the statistics it computes, so the BatchNorm
running averages come from the clean pass only. With ``--m-sharpness M`` the step is
:func:`sam_jax.m_sharpness_update` with the same chain (each chunk of M examples perturbed
with its own gradient; the running statistics are the mean over the chunks of what each
chunk's clean pass gives).

:func:`train` is the training loop as a function (``train(config) -> history``), called by
:func:`main`, the benchmarks and the label-noise study; with ``config.out`` set, each epoch
writes ``metrics.csv``/``metrics.json`` and ``checkpoint.pkl`` there, and ``--resume``
continues exactly.
"""

from __future__ import annotations

import functools
import math
import pickle
import sys
import time
from collections.abc import Callable
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

import sam_core
import sam_jax
from examples.calibration import expected_calibration_error
from examples.cli import (
    check_chunks,
    end_epoch,
    form_option,
    lr_at,
    parse_args,
    print_epoch,
)
from examples.data import Split, TrainingData, batches, epoch_rng, fit_metrics, load_training_data
from examples.optimizers import ESAM_GAMMA, OPTAX_OPTIMIZERS, check_m_sharpness, make_optax
from examples.trajectory import indexed_batches, jax_trajectory_term, jax_update_kwargs

__all__ = ["TrainState", "init_state", "main", "make_steps", "train"]

CHECKPOINT = "checkpoint.pkl"


class TrainState(NamedTuple):
    """Everything a step changes: parameters, BatchNorm statistics, optimizer state."""

    params: Any
    batch_stats: Any
    opt_state: Any


def _first_state(opt_state: Any) -> Any:
    """The chain's first state (the SAM-family one), unwrapped from
    ``optax.inject_hyperparams`` (a scheduled rho) when wrapped."""
    return getattr(opt_state[0], "inner_state", opt_state[0])


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    r"""Mean of :math:`-\sum_k q_k \log p_k` with :math:`q = (1 - s)\,\mathrm{onehot} + s / K`
    (``torch.nn.functional.cross_entropy(..., label_smoothing=s)``)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def per_example_cross_entropy(
    logits: jax.Array, labels: jax.Array, smoothing: float
) -> jax.Array:
    """The per-example losses of :func:`smoothed_cross_entropy` (``reduction="none"``),
    shape ``(B,)``: ESAM's per-example loss contract."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


@functools.lru_cache(maxsize=8)
def make_steps(config: tuple[tuple[str, Any], ...], steps_per_epoch: int) -> tuple[Any, ...]:
    """``(model, tx, train_step, eval_step)`` for a hashable ``config`` (the arguments),
    cached so that resuming in the same process reuses the compiled steps.

    ``train_step(state, x, y, full_step)`` returns ``(state, (loss, correct, sharpness))``;
    for SAF and MESA it is ``train_step(state, x, y, indices, epoch, active)`` returning
    ``(state, (loss, correct, trajectory_term))``, jitted with ``active`` static (two
    compiled steps, the term compiled out before the start epoch). It is jitted, except for AE-SAM, where it is two jitted steps chosen on the host: the
    clean pass with the update of a ``grad_fn`` that evaluates nothing (its ``lax.cond``
    holds no model), whose result is the step when the rule chose a plain step
    (``state.is_sam_step`` False, read on the host), and on a SAM step the update again from
    the same state and clean gradient with ``full_step=True`` and the perturbed pass (no
    ``lax.cond`` around the model, which costs ~2.2x on XLA:CPU)."""
    args = _Args(dict(config))
    model = _model(args.dataset, args.depth, args.width, args.num_classes)
    tx = make_optax(args.optimizer, args, steps_per_epoch)
    entry = OPTAX_OPTIMIZERS[args.optimizer]
    needs_grad_fn = entry.needs_grad_fn
    needs_clean_grad = entry.needs_clean_grad

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

    def per_example_loss_fn(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> Any:
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True,
            mutable=["batch_stats"],
        )
        losses = per_example_cross_entropy(logits, y, args.label_smoothing)
        return losses.mean(), (losses, logits, new_vars["batch_stats"])

    def perturbed_grad_fn(state: TrainState, x: jax.Array, y: jax.Array) -> Any:
        def grad_fn(perturbed: Any) -> tuple[jax.Array, Any]:
            # Batch statistics of w + e normalize this pass; their update is discarded.
            (p_loss, _), p_grads = value_and_grad(perturbed, state.batch_stats, x, y)
            return p_loss, p_grads

        return grad_fn

    m = args.m_sharpness
    # lax.scan (one chunk at a time) or jax.vmap (all chunks at once, per-chunk weights)
    m_impl = {"auto": "auto", "loop": "scan", "vectorized": "vmap"}[
        args.m_sharpness_impl or "auto"
    ]

    @functools.partial(jax.jit, static_argnames="active")
    def trajectory_step(
        state: TrainState, x: jax.Array, y: jax.Array, indices: jax.Array, epoch: jax.Array,
        active: bool,
    ) -> tuple[TrainState, Any]:
        # SAF / MESA: one forward-backward of CE + the trajectory term; ``active`` (static,
        # chosen on the host per epoch) compiles the term out before the start epoch, so
        # MESA's EMA forward runs only on the epochs with it
        def total_loss(params: Any) -> Any:
            loss, (logits, new_stats) = loss_fn(params, state.batch_stats, x, y)
            term = jnp.zeros((), loss.dtype)
            if active:
                def ema_apply(ema: Any) -> jax.Array:
                    # MESA: eval mode with the running statistics after this batch's clean
                    # pass (torch's order: the model's buffers once model(x) has run)
                    return model.apply({"params": ema, "batch_stats": new_stats}, x, train=False)

                term = jax_trajectory_term(state.opt_state, logits, ema_apply, indices, epoch)
            return loss + term, (loss, term, logits, new_stats)

        (_, (loss, term, logits, new_stats)), grads = jax.value_and_grad(
            total_loss, has_aux=True
        )(state.params)
        updates, opt_state = tx.update(
            grads, state.opt_state, state.params,
            **jax_update_kwargs(state.opt_state, logits, indices, epoch),
        )
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return TrainState(params, new_stats, opt_state), (loss, correct, term)

    @functools.partial(jax.jit, static_argnames="full_step")
    def train_step(
        state: TrainState, x: jax.Array, y: jax.Array, full_step: bool | None = None
    ) -> tuple[TrainState, Any]:
        if m is not None:
            # m-sharpness: each chunk of m examples perturbed with its own gradient, every
            # chunk normalized with its own batch statistics; the running statistics are
            # the mean over the chunks of what each chunk's clean pass gives.
            def chunk_loss(params: Any, chunk: tuple[jax.Array, jax.Array]) -> Any:
                return loss_fn(params, state.batch_stats, *chunk)

            updates, opt_state, loss, (logits, stats) = sam_jax.m_sharpness_update(
                tx, chunk_loss, state.params, state.opt_state, (x, y), m=m, has_aux=True,
                impl=m_impl,
            )
            new_stats = jax.tree.map(lambda s: jnp.mean(s, 0), stats)
            logits = jnp.reshape(logits, (-1, logits.shape[-1]))
            params = optax.apply_updates(state.params, updates)
            correct = jnp.sum(jnp.argmax(logits, -1) == y)
            sharpness = _first_state(opt_state).sharpness
            return TrainState(params, new_stats, opt_state), (loss, correct, sharpness)
        if entry.per_example_loss:  # ESAM: the per-example loss contract of sam_jax.esam
            (loss, (losses, logits, new_stats)), grads = jax.value_and_grad(
                per_example_loss_fn, has_aux=True
            )(state.params, state.batch_stats, x, y)

            def example_losses(perturbed: Any, index: jax.Array | None = None) -> jax.Array:
                # at w + e: the selection's forward (index None) and the selected examples'
                # pass; their batch statistics normalize them and are discarded
                xs, ys = (x, y) if index is None else (x[index], y[index])
                logits_e, _ = model.apply(
                    {"params": perturbed, "batch_stats": state.batch_stats}, xs, train=True,
                    mutable=["batch_stats"],
                )
                return per_example_cross_entropy(logits_e, ys, args.label_smoothing)

            updates, opt_state = tx.update(
                grads, state.opt_state, state.params, loss_fn=example_losses, losses=losses,
                value=loss,
            )
            params = optax.apply_updates(state.params, updates)
            correct = jnp.sum(jnp.argmax(logits, -1) == y)
            sharpness = _first_state(opt_state).sharpness
            return TrainState(params, new_stats, opt_state), (loss, correct, sharpness)
        if not needs_clean_grad:
            # Momentum-SAM: one pass, at w + e; BSAM: two, at a posterior sample and at the
            # perturbed mean. The first pass's statistics are kept.
            found: list[Any] = []

            def one_pass(perturbed: Any) -> tuple[jax.Array, Any]:
                (p_loss, aux), p_grads = value_and_grad(perturbed, state.batch_stats, x, y)
                found.append(aux)  # read below, in the same trace (no control flow around)
                return p_loss, p_grads

            updates, opt_state = tx.update(None, state.opt_state, state.params, grad_fn=one_pass)
            logits, new_stats = found[0]
            first_state = _first_state(opt_state)
            # Momentum-SAM's loss is the one at w + e, BSAM's the one at the sample (torch's)
            loss = first_state.value if entry.grad_fn_passes == 2 else first_state.perturbed_value
            params = optax.apply_updates(state.params, updates)
            correct = jnp.sum(jnp.argmax(logits, -1) == y)
            return TrainState(params, new_stats, opt_state), (loss, correct, jnp.float32(jnp.nan))
        (loss, (logits, new_stats)), grads = value_and_grad(state.params, state.batch_stats, x, y)
        if needs_grad_fn:
            extra = {} if full_step is None else {"full_step": full_step}
            updates, opt_state = tx.update(
                grads, state.opt_state, state.params, grad_fn=perturbed_grad_fn(state, x, y),
                value=loss, **extra,
            )
            sharpness = _first_state(opt_state).sharpness
        else:
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            sharpness = jnp.float32(jnp.nan)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return TrainState(params, new_stats, opt_state), (loss, correct, sharpness)

    if entry.decided_on_host:
        train_step = _host_decided_step(tx, value_and_grad, perturbed_grad_fn)
    if entry.trajectory:
        train_step = trajectory_step

    eval_variables = _eval_fn(
        args.dataset, args.depth, args.width, args.num_classes, args.label_smoothing
    )

    def eval_step(state: TrainState, x: jax.Array, y: jax.Array) -> Any:
        return eval_variables(state.params, state.batch_stats, x, y)

    return model, tx, train_step, eval_step


def _host_decided_step(tx: Any, value_and_grad: Any, perturbed_grad_fn: Any) -> Any:
    """AE-SAM's step (:func:`make_steps`): a clean step, and on the rule's SAM steps the
    full update from the same state with ``full_step=True``."""

    @jax.jit
    def clean_step(state: TrainState, x: jax.Array, y: jax.Array) -> Any:
        (loss, (logits, new_stats)), grads = value_and_grad(state.params, state.batch_stats, x, y)

        def no_pass(perturbed: Any) -> tuple[jax.Array, Any]:
            # taken only on SAM steps, whose result is replaced by sam_step's
            return jnp.zeros((), loss.dtype), jax.tree.map(jnp.zeros_like, perturbed)

        updates, opt_state = tx.update(
            grads, state.opt_state, state.params, grad_fn=no_pass, value=loss
        )
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        new_state = TrainState(params, new_stats, opt_state)
        return new_state, (loss, correct, jnp.float32(jnp.nan)), grads, new_stats

    @jax.jit
    def sam_step(
        state: TrainState, grads: Any, loss: jax.Array, correct: jax.Array, new_stats: Any,
        x: jax.Array, y: jax.Array,
    ) -> Any:
        updates, opt_state = tx.update(
            grads, state.opt_state, state.params, grad_fn=perturbed_grad_fn(state, x, y),
            value=loss, full_step=True,
        )
        params = optax.apply_updates(state.params, updates)
        sharpness = _first_state(opt_state).sharpness
        return TrainState(params, new_stats, opt_state), (loss, correct, sharpness)

    def train_step(
        state: TrainState, x: jax.Array, y: jax.Array, full_step: bool | None = None
    ) -> tuple[TrainState, Any]:
        del full_step  # the rule's choice, read below
        plain, aux, grads, new_stats = clean_step(state, x, y)
        if not bool(_first_state(plain.opt_state).is_sam_step):  # one host read per step
            return plain, aux
        return sam_step(state, grads, aux[0], aux[1], new_stats, x, y)

    return train_step


def _trajectory_active(opt_state: Any, epoch: int) -> bool:
    """Whether SAF's / MESA's term is on at zero-based ``epoch`` (its state's start and end
    epochs, read on the host)."""
    return bool(sam_core.trajectory_active(
        epoch, int(opt_state.start_epoch), int(opt_state.end_epoch)
    ))


def _model(dataset: str, depth: int, width: int, num_classes: int) -> Any:
    """The Flax model of a run: the digits CNN or a WideResNet."""
    if dataset == "digits":
        from examples.cnn_flax import SmallCNN

        return SmallCNN(num_classes)
    from examples.wrn_flax import WideResNet

    return WideResNet(depth, width, num_classes)


@functools.lru_cache(maxsize=4)
def _proba_fn(dataset: str, depth: int, width: int, num_classes: int) -> Any:
    """Jitted ``(params, batch_stats, x) -> softmax probabilities`` in eval mode."""
    model = _model(dataset, depth, width, num_classes)

    @jax.jit
    def proba(params: Any, batch_stats: Any, x: jax.Array) -> Any:
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jax.nn.softmax(logits.astype(jnp.float32))

    return proba


@functools.lru_cache(maxsize=4)
def _bsam_proba_fn(dataset: str, depth: int, width: int, num_classes: int) -> Any:
    """Jitted ``(params, batch_stats, opt_state, x, key) -> probabilities``: BSAM's
    predictive (:func:`sam_jax.predictive`, eval mode, :data:`BSAM_SAMPLES` samples)."""
    model = _model(dataset, depth, width, num_classes)

    @jax.jit
    def proba(params: Any, batch_stats: Any, opt_state: Any, x: jax.Array, key: Any) -> Any:
        def apply_fn(p: Any, inputs: jax.Array) -> jax.Array:
            out = model.apply({"params": p, "batch_stats": batch_stats}, inputs, train=False)
            return out.astype(jnp.float32)

        return sam_jax.predictive(
            apply_fn, params, opt_state, x, key=key, samples=BSAM_SAMPLES
        )

    return proba


#: Posterior samples BSAM's predictive averages for the final calibration (the torch
#: loop's number).
BSAM_SAMPLES = 8


def calibration(state: TrainState, split: Split, args: Any, num_classes: int) -> dict[str, float]:
    """``test_ece`` (:func:`examples.calibration.expected_calibration_error`) and the accuracy
    of the same probabilities: the softmax of the model, or BSAM's predictive (softmax
    averaged over :data:`BSAM_SAMPLES` posterior samples, the same samples for every batch,
    drawn from ``jax.random.key(args.seed)``)."""
    if getattr(args, "optimizer", None) == "bsam":
        bsam_proba = _bsam_proba_fn(args.dataset, args.depth, args.width, num_classes)
        key = jax.random.key(int(getattr(args, "seed", 0) or 0))

        def proba(params: Any, batch_stats: Any, x: jax.Array) -> Any:
            return bsam_proba(params, batch_stats, state.opt_state, x, key)
    else:
        proba = _proba_fn(args.dataset, args.depth, args.width, num_classes)
    probs = np.concatenate([
        np.asarray(proba(state.params, state.batch_stats, jnp.asarray(x)), np.float64)
        for x, _ in batches(split, args.eval_batch_size, dataset=args.dataset)
    ])
    return {
        "test_ece": expected_calibration_error(probs, split.labels),
        "test_acc_calibrated": float((probs.argmax(1) == split.labels).mean()),
    }


@functools.lru_cache(maxsize=4)
def _eval_fn(
    dataset: str, depth: int, width: int, num_classes: int, label_smoothing: float
) -> Any:
    """Jitted ``(params, batch_stats, x, y) -> (summed loss, correct, predictions)`` in eval
    mode, shared by every optimizer (it does not see the optimizer state)."""
    model = _model(dataset, depth, width, num_classes)

    @jax.jit
    def eval_step(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> Any:
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        loss = smoothed_cross_entropy(logits, y, label_smoothing)
        predictions = jnp.argmax(logits, -1)
        return loss * len(y), jnp.sum(predictions == y), predictions

    return eval_step


@functools.lru_cache(maxsize=4)
def _init_fn(depth: int, width: int, num_classes: int) -> Any:
    """Jitted WideResNet ``model.init`` (compiled once per architecture and process)."""
    from examples.wrn_flax import WideResNet

    model = WideResNet(depth, width, num_classes)
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))


def init_state(config: Any, data: TrainingData, tx: Any) -> TrainState:
    """Initial parameters, statistics and optimizer state: the digits CNN from
    :func:`examples.cnn_flax.init_variables` (PyTorch's initial weights for the seed), a
    WideResNet from ``jax.random.key(config.seed)``."""
    if data.name == "digits":
        from examples.cnn_flax import init_variables

        _, h, _, c = data.train.images.shape
        variables = init_variables(
            config.seed, in_channels=c, num_classes=data.num_classes, image_size=h
        )
    else:
        variables = _init_fn(config.depth, config.width, data.num_classes)(
            jax.random.key(config.seed)
        )
    params = variables["params"]
    return TrainState(params, variables["batch_stats"], tx.init(params))


class _Args:
    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


_STEP_KEYS = (
    "dataset",
    "m_sharpness",
    "m_sharpness_impl",
    "depth",
    "width",
    "num_classes",
    "optimizer",
    "rho",
    "rho_warmup_epochs",
    "eta",
    "k",
    "alpha",
    *(f"saf_{key}" for key in sam_core.SAF_DEFAULTS),
    *(f"mesa_{key}" for key in sam_core.MESA_DEFAULTS),
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "schedule",
    "epochs",
    "label_smoothing",
)


def evaluate(
    eval_step: Any, state: TrainState, split: Split, args: Any
) -> tuple[float, float, np.ndarray]:
    """``(mean label-smoothed loss, accuracy, predictions)`` in eval mode (running
    statistics)."""
    loss_sum, correct, predictions = 0.0, 0, []
    for x, y in batches(split, args.eval_batch_size, dataset=args.dataset):
        batch_loss, batch_correct, batch_pred = eval_step(state, jnp.asarray(x), jnp.asarray(y))
        loss_sum += float(batch_loss)
        correct += int(batch_correct)
        predictions.append(np.asarray(batch_pred))
    return loss_sum / len(split), correct / len(split), np.concatenate(predictions)


def train(
    config: Any, progress: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Train as ``config`` (the scripts' arguments, :func:`examples.cli.make_config`) says
    and return the history (:func:`train_model` without the final state)."""
    return train_model(config, progress)[0]


def train_model(
    config: Any, progress: Callable[[dict[str, Any]], None] | None = None
) -> tuple[list[dict[str, Any]], TrainState]:
    """Train as ``config`` says; return ``(history, state)``, the final :class:`TrainState`
    (parameters and BatchNorm statistics for analyses such as sharpness measures).

    Returns the history, one dict per epoch with the keys of
    :func:`examples.train_torch.train`, the passes and forwards counted by the same rule
    (with m-sharpness, ``train_acc`` comes from the
    chunks' clean logits, which :func:`sam_jax.m_sharpness_update` returns). ``progress(metrics)`` is called after each epoch. Files are written only
    when ``config.out`` is set.
    """
    check_m_sharpness(config.optimizer, getattr(config, "m_sharpness", None))
    data = load_training_data(config)
    train_split = data.train
    check_chunks(config, len(train_split))
    steps_per_epoch = math.ceil(len(train_split) / config.batch_size)
    augment = data.name != "digits" and not getattr(config, "no_augment", False)
    noisy = bool(data.flipped.any())
    step_config = {k: getattr(config, k, None) for k in _STEP_KEYS}
    step_config["num_classes"] = data.num_classes
    step_config["num_data"] = len(train_split)  # BSAM's posterior needs it
    # ESAM's masks and BSAM's noise are seeded by the run (the other forms' compiled steps
    # do not depend on the seed, so one compilation serves every seed)
    seeded = config.optimizer in ("esam", "bsam")
    step_config["seed"] = int(config.seed) if seeded else None
    _, tx, train_step, eval_step = make_steps(tuple(sorted(step_config.items())), steps_per_epoch)
    state = init_state(config, data, tx)

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
            with open(path, "rb") as f:  # our own file: pickle of NumPy arrays and lists
                ckpt = pickle.load(f)
            state = serialization.from_state_dict(state, ckpt["state"])
            start_epoch, history = ckpt["epoch"], ckpt["history"]
            print(f"resumed from {path} at epoch {start_epoch}")
        elif resume != "auto":
            raise SystemExit(f"--resume {path}: no such checkpoint file")

    entry = OPTAX_OPTIMIZERS[config.optimizer]
    two_pass = entry.needs_grad_fn or entry.per_example_loss  # a perturbed pass (or two)
    full_step_at = entry.full_step
    k = form_option(config, "k", config.optimizer) if full_step_at is not None else None
    m = getattr(config, "m_sharpness", None)
    trajectory = entry.trajectory
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        seen, loss_sum, correct, sharp_sum, sharp_seen = 0, 0.0, 0, 0.0, 0
        passes, steps = 0, 0  # forward-backward passes over a batch, optimizer steps
        forwards = 0  # forwards over a batch without backward (MESA's EMA, ESAM's selection)
        term_sum = 0.0  # SAF / MESA: the trajectory term, summed over the examples
        if trajectory:  # the same batches with their indices into the training set
            active = _trajectory_active(state.opt_state, epoch)  # one host read per epoch
            mesa_forward = int(active and isinstance(state.opt_state, sam_jax.MESAState))
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
            t = epoch * steps_per_epoch + i
            full_step = None if full_step_at is None else full_step_at(t, k)
            if trajectory:
                state, (loss, batch_correct, term) = train_step(
                    state, jnp.asarray(x), jnp.asarray(y), jnp.asarray(batch[2], jnp.int32),
                    jnp.asarray(epoch, jnp.int32), active,
                )
                sharpness = jnp.float32(jnp.nan)
                forwards += mesa_forward
                term_sum += float(term) * len(y)
            else:
                state, (loss, batch_correct, sharpness) = train_step(
                    state, jnp.asarray(x), jnp.asarray(y), full_step
                )
            # what the compiled step computes: a clean pass unless the form needs none, and a
            # perturbed one unless this is a one-pass step (chosen on the host)
            steps += 1
            if m is not None:
                passes += 2
            elif entry.per_example_loss:  # ESAM: the batch at w, its k selected at w + e
                passes += 1 + sam_core.sds_count(len(y), ESAM_GAMMA) / len(y)
                forwards += 1  # the selection's forward at w + e, without backward
            elif entry.decided_on_host:  # AE-SAM: the perturbed pass on its SAM steps only
                passes += 1 + int(bool(_first_state(state.opt_state).is_sam_step))
            else:
                passes += int(entry.needs_clean_grad) + entry.grad_fn_passes * int(
                    two_pass and full_step is not False
                )
            seen += len(y)
            loss_sum += float(loss) * len(y)
            correct += int(batch_correct)
            if math.isfinite(float(sharpness)):  # one-pass steps measure no sharpness
                sharp_sum += float(sharpness) * len(y)
                sharp_seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        test_loss, test_acc, _ = evaluate(eval_step, state, data.test, config)
        fit: dict[str, float | None] = {"noisy_fit": None, "clean_fit": None}
        if noisy:
            fit = fit_metrics(evaluate(eval_step, state, train_split, config)[2], data)
        metrics = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
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
        if epoch + 1 == config.epochs:
            metrics.update(calibration(state, data.test, config, data.num_classes))

        def save(path: Path, epoch: int = epoch, state: TrainState = state) -> None:
            with open(path, "wb") as f:
                pickle.dump(
                    {
                        "state": serialization.to_state_dict(jax.device_get(state)),
                        "epoch": epoch + 1,
                        "history": history,
                        "args": vars(config),
                    },
                    f,
                )

        if end_epoch(history, metrics, config, progress=progress, out=out,
                     checkpoint=CHECKPOINT, save=save):
            break
    return history, state


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run training from the command line; return the last epoch's metrics."""
    args = parse_args("Train with sam_jax (WideResNet on CIFAR, small CNN on digits).", argv)
    history = train(args, progress=lambda m: print_epoch(m, args.epochs))
    final = history[-1] if history else {}
    if final and (args.stop_after_epoch is None or final["epoch"] >= args.epochs):
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
