"""The command-line flags shared by ``train_torch.py`` and ``train_jax.py``, the learning-rate
schedule, metrics files and a few helpers both scripts use.

Defaults are the widely cited WRN-16-8 CIFAR setup of the SAM paper (Foret et al., ICLR 2021):
batch 128, lr 0.1, momentum 0.9, weight decay 5e-4, label smoothing 0.1, 200 epochs, step
schedule (x0.2 at 30%, 60%, 80% of training), rho 0.05 for SAM. ASAM defaults to rho 0.5 with
eta 0.01, the setting of the ASAM authors' code (Kwon et al., ICML 2021).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sam_core

__all__ = [
    "DEFAULT_RHO",
    "FORM_OPTIONS",
    "RHO_WARMUP_OPTIMIZERS",
    "TRAJECTORY_FORMS",
    "build_parser",
    "check_chunks",
    "form_option",
    "lr_at",
    "make_config",
    "optimizer_names",
    "parse_args",
    "print_epoch",
    "rho_warmup_steps",
    "step_milestones",
    "write_metrics",
]

DEFAULT_RHO = {"sam": 0.05, "asam": 0.5}
#: Optimizers that take ``--rho-warmup-epochs`` (in both backends): every SAM-family form.
RHO_WARMUP_OPTIMIZERS = (
    "sam", "asam", "gsam", "samon", "looksam", "everyk", "msam", "fsam", "wsam", "vasso",
    "aesam", "esam",
)
#: A form's own knobs (``--k``, ``--alpha``, ``--saf-start-epoch``, ...): flag (its Python
#: name) -> (the forms that take it, their default). SAF's and MESA's are the library's
#: defaults (:data:`sam_core.SAF_DEFAULTS`, :data:`sam_core.MESA_DEFAULTS`, the paper's).
FORM_OPTIONS: dict[str, dict[str, Any]] = {
    "k": {"looksam": 5, "everyk": 5},
    "alpha": {"looksam": 0.7, "gsam": 0.2},
    **{f"saf_{key}": {"saf": value} for key, value in sam_core.SAF_DEFAULTS.items()},
    **{f"mesa_{key}": {"mesa": value} for key, value in sam_core.MESA_DEFAULTS.items()},
}
#: The forms that add a trajectory loss instead of perturbing (no rho, no m-sharpness):
#: SAF and MESA (:mod:`examples.trajectory`).
TRAJECTORY_FORMS = ("saf", "mesa")
STEP_FRACTIONS = (0.3, 0.6, 0.8)
STEP_GAMMA = 0.2


def build_parser(description: str) -> argparse.ArgumentParser:
    """The parser both training scripts use, so their flags are identical."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ etc.")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument(
        "--dataset",
        choices=("cifar10", "cifar100", "digits"),
        default="cifar10",
        help="digits: scikit-learn's bundled 8x8 digits (no download) with a small CNN "
        "(--depth/--width then do not apply)",
    )
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="CIFAR without crop/flip/Cutout (the digits are never augmented)",
    )
    p.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        metavar="P",
        help="flip this fraction of the training labels to another class (symmetric noise; "
        "test labels stay clean)",
    )
    p.add_argument(
        "--noise-seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the label noise, independent of --seed so that every optimizer and "
        "both backends see the same labels",
    )
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--schedule", choices=("step", "cosine"), default="step")
    p.add_argument(
        "--optimizer",
        default="sam",
        help=" | ".join(optimizer_names()) + " (the registry of examples/optimizers.py)",
    )
    p.add_argument(
        "--m-sharpness",
        type=int,
        default=None,
        metavar="M",
        help="perturb each chunk of M examples of a batch with its own gradient (m-sharpness; "
        "SAM-family optimizers; M divides the batch size)",
    )
    p.add_argument(
        "--m-sharpness-impl",
        choices=("auto", "loop", "vectorized"),
        default="auto",
        help="how the chunks run: a loop (torch: vectorize=False; JAX: lax.scan) or "
        "vectorized (torch.func / jax.vmap); auto: the library's choice for the device. "
        "Same numbers either way",
    )
    p.add_argument("--rho", type=float, default=None, help="default: 0.05 for sam, 0.5 for asam")
    p.add_argument(
        "--rho-warmup-epochs",
        type=float,
        default=0.0,
        metavar="E",
        help="ramp rho linearly from 0 over the first E epochs' steps (every SAM-family form; "
        "sam_torch.RhoWarmup / sam_jax.rho_warmup_schedule); 0: constant rho",
    )
    p.add_argument("--eta", type=float, default=0.01, help="ASAM offset in T_w = |w| + eta")
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="looksam / everyk: a full SAM step every k steps, one pass on the others "
        "(default 5)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="looksam: weight of the reused orthogonal direction g_v (default 0.7); gsam: "
        "weight of the clean gradient's orthogonal part (default 0.2)",
    )
    for form, defaults in (("saf", sam_core.SAF_DEFAULTS), ("mesa", sam_core.MESA_DEFAULTS)):
        for key, value in defaults.items():  # the trajectory forms' knobs (docs/variants.md)
            p.add_argument(
                f"--{form}-{key.replace('_', '-')}", type=type(value), default=None,
                help=f"{form}: {key} of sam_torch.{form.upper()} / sam_jax.{form} "
                f"(default {value:g})",
            )
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--limit-train", type=int, default=None, help="use the first N train images")
    p.add_argument("--limit-test", type=int, default=None, help="use the first N test images")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/wrn", help="folder for metrics and checkpoints")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="resume from this checkpoint (no value: the one in --out)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    p.add_argument(
        "--stop-after-epoch",
        type=int,
        default=None,
        help="stop after this epoch as if preempted (to test --resume)",
    )
    p.add_argument("--no-progress", action="store_true", help="disable tqdm bars")
    return p


def optimizer_names() -> list[str]:
    """Every optimizer name of the registries in :mod:`examples.optimizers` (both backends)."""
    from examples.optimizers import OPTAX_OPTIMIZERS, TORCH_OPTIMIZERS

    return sorted(set(TORCH_OPTIMIZERS) | set(OPTAX_OPTIMIZERS))


def _complete(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-optimizer ``rho`` default and validate; errors are ``SystemExit``."""
    if args.rho is None:
        args.rho = DEFAULT_RHO.get(args.optimizer, 0.05)
    for name in ("epochs", "batch_size", "eval_batch_size"):
        value = getattr(args, name)
        if value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("limit_train", "limit_test"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1 or omitted, got {value}")
    if not 0.0 <= args.label_noise <= 1.0:
        raise SystemExit(f"--label-noise must be a fraction in [0, 1], got {args.label_noise}")
    if args.noise_seed < 0:
        raise SystemExit(f"--noise-seed must be >= 0, got {args.noise_seed}")
    warmup = args.rho_warmup_epochs
    if not warmup >= 0.0:
        raise SystemExit(f"--rho-warmup-epochs must be >= 0, got {warmup}")
    if warmup > 0.0 and args.optimizer not in RHO_WARMUP_OPTIMIZERS:
        raise SystemExit(
            f"--rho-warmup-epochs ramps rho, so it needs a SAM-family --optimizer (one of "
            f"{', '.join(RHO_WARMUP_OPTIMIZERS)}), got {args.optimizer!r}; drop the flag for it"
        )
    for flag, forms in FORM_OPTIONS.items():
        if getattr(args, flag, None) is not None and args.optimizer not in forms:
            raise SystemExit(
                f"--{flag.replace('_', '-')} applies to --optimizer {' or '.join(forms)}, got "
                f"{args.optimizer!r}; "
                "drop the flag for it"
            )
    m = args.m_sharpness
    if m is not None:
        if m < 1 or args.batch_size % m:
            divisors = [d for d in range(1, args.batch_size + 1) if args.batch_size % d == 0]
            raise SystemExit(
                f"--m-sharpness must divide --batch-size {args.batch_size}, got {m}; "
                f"choose one of {divisors}"
            )
        if args.optimizer == "sgd":
            raise SystemExit("--m-sharpness needs a SAM-family --optimizer (e.g. sam), got sgd")
    return args


def parse_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    """Parse and complete the arguments (``rho`` default per optimizer); validate sizes."""
    return _complete(build_parser(description).parse_args(argv))


def make_config(**overrides: Any) -> argparse.Namespace:
    """The scripts' arguments with their defaults, ``overrides`` applied (Python names,
    e.g. ``make_config(dataset="digits", optimizer="sam", epochs=2, label_noise=0.4)``),
    completed and validated as :func:`parse_args` does. ``out`` defaults to ``None``: the
    training functions then write no files and return the history only.

    Raises:
        TypeError: an override that is not one of the scripts' arguments.
    """
    args = build_parser("config").parse_args([])
    args.out = None
    args.no_progress = True
    unknown = sorted(set(overrides) - set(vars(args)))
    if unknown:
        raise TypeError(f"make_config got unknown arguments {unknown}; known: {sorted(vars(args))}")
    for key, value in overrides.items():
        setattr(args, key, value)
    return _complete(args)


def form_option(args: Any, flag: str, form: str) -> Any:
    """Form ``form``'s knob ``flag`` (``"k"``, ``"alpha"``): the argument when given, else the
    form's default (:data:`FORM_OPTIONS`)."""
    value = getattr(args, flag, None)
    return FORM_OPTIONS[flag][form] if value is None else value


def rho_warmup_steps(args: Any, steps_per_epoch: int) -> int:
    """``--rho-warmup-epochs`` in optimizer steps (rounded), the same in both backends."""
    return round(float(getattr(args, "rho_warmup_epochs", 0.0) or 0.0) * steps_per_epoch)


def step_milestones(epochs: int) -> list[int]:
    """Epochs at which the step schedule multiplies the rate by 0.2."""
    return [max(1, round(f * epochs)) for f in STEP_FRACTIONS]


def lr_at(step: int, *, lr: float, schedule: str, epochs: int, steps_per_epoch: int) -> float:
    r"""Learning rate of optimizer step ``step`` (0-based), the same in both backends.

    ``step``: :math:`\eta_t = \eta \cdot 0.2^{|\{m : m \le e(t)\}|}` with epoch
    :math:`e(t) = \lfloor t / S \rfloor` and milestones at 30%, 60%, 80% of the epochs;
    ``cosine``: :math:`\eta_t = \frac{\eta}{2} (1 + \cos(\pi t / T))`, :math:`T` the total
    number of steps.
    """
    if schedule == "step":
        epoch = step // steps_per_epoch
        return lr * STEP_GAMMA ** sum(epoch >= m for m in step_milestones(epochs))
    if schedule == "cosine":
        total = epochs * steps_per_epoch
        return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / total))
    raise ValueError(f"schedule must be 'step' or 'cosine', got {schedule!r}")


def write_metrics(out: str | os.PathLike[str], history: list[dict[str, Any]], args: Any) -> None:
    """Write ``metrics.csv`` and ``metrics.json`` (history plus the arguments) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if history:
        tmp = out / "metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        tmp.replace(out / "metrics.csv")
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps({"args": vars(args), "history": history}, indent=1))
    tmp.replace(out / "metrics.json")



def end_epoch(
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    config: Any,
    *,
    progress: Callable[[dict[str, Any]], Any] | None,
    out: Path | None,
    checkpoint: str,
    save: Callable[[Path], None],
) -> bool:
    """The end of an epoch in both backends' loops: record ``metrics`` in ``history``, report
    it to ``progress``, and with ``out`` write the metrics files and the checkpoint (``save``
    writes it to a temporary path that then replaces ``out / checkpoint``, so an interrupted
    write never leaves a broken checkpoint). Returns True when ``--stop-after-epoch`` says to
    stop here."""
    history.append(metrics)
    if progress is not None:
        progress(metrics)
    if out is not None:
        write_metrics(out, history, config)
        tmp = out / (checkpoint + ".tmp")
        save(tmp)
        os.replace(tmp, out / checkpoint)
    stop = getattr(config, "stop_after_epoch", None)
    if stop is not None and metrics["epoch"] >= stop:
        print(f"stopping after epoch {metrics['epoch']} (--stop-after-epoch)")
        return True
    return False

def check_chunks(config: Any, n_train: int) -> None:
    """With m-sharpness, every batch (the last, partial one too) must split into chunks of m."""
    m = getattr(config, "m_sharpness", None)
    last = n_train % config.batch_size
    if m is not None and last % m:
        raise ValueError(
            f"m_sharpness {m} must divide every batch, but the last batch of the "
            f"{n_train} training examples has {last}; pick --limit-train so that "
            f"N mod batch_size is a multiple of {m} (e.g. a multiple of --batch-size)"
        )


def print_epoch(metrics: dict[str, Any], epochs: int) -> None:
    """One line per epoch (the scripts' progress callback)."""
    line = f"epoch {metrics['epoch']}/{epochs} train loss {metrics['train_loss']:.4f}"
    if metrics["train_acc"] is not None:
        line += f" acc {metrics['train_acc']:.4f}"
    line += f" | test loss {metrics['test_loss']:.4f} acc {metrics['test_acc']:.4f}"
    if metrics.get("noisy_fit") is not None:
        line += f" | noisy_fit {metrics['noisy_fit']:.4f} clean_fit {metrics['clean_fit']:.4f}"
    print(line)
