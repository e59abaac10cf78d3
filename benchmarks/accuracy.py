"""Section 5, accuracy: SGD against SAM on real data, in both backends, through the examples'
training functions (:func:`examples.train_torch.train_model`, :func:`examples.train_jax.train`;
this section keeps no training loop of its own).

* CIFAR-10 found (``--data-dir`` or a default folder): SGD, SAM and ASAM (and any SAM-family
  variant named in ``--optimizers``, torch) on a CIFAR-10 subset, and a 1-D loss landscape
  through the torch SGD and SAM solutions (:func:`run_cifar`).
* No CIFAR-10: scikit-learn's bundled digits (no download) with 40 % symmetric label noise,
  SGD, SAM and m-SAM (m = 16) in the settings of the label-noise study
  (:mod:`benchmarks.label_noise`), where SAM's gain shows within minutes
  (:func:`run_digits`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import ASAM_RHO, LR, MOMENTUM, RHO, WEIGHT_DECAY, jax_unavailable

TITLE = "5. Accuracy"
ESTIMATE_S = {"smoke": 15, "quick": 80, "full": 1600}
_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Budget:
    """Size of the accuracy run (section 5)."""

    epochs: int = 4
    width: int = 2
    depth: int = 16
    subset: int = 5000  # training images
    test_subset: int = 2000
    batch: int = 128


BUDGETS = {
    "smoke": Budget(epochs=1, width=1, depth=10, subset=256, test_subset=128, batch=64),
    "quick": Budget(epochs=2, width=1, depth=10, subset=1000, test_subset=500),
    "small": Budget(epochs=2, width=1, depth=16, subset=5000, test_subset=1000),
    "default": Budget(),
    "long": Budget(epochs=30, width=8, depth=16, subset=50000, test_subset=10000),
}


def parse_budget(text: str) -> Budget:
    """A preset name (``smoke``, ``quick``, ``small``, ``default``, ``long``) or
    ``key=value,...`` (unset keys from ``default``)."""
    if text in BUDGETS:
        return BUDGETS[text]
    fields = {f.name for f in dataclasses.fields(Budget)}
    values: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in fields or not value.strip().isdigit() or int(value) <= 0:
            raise argparse.ArgumentTypeError(
                f"--budget must be one of {sorted(BUDGETS)} or comma-separated key=value "
                f"pairs with keys {sorted(fields)} and positive integer values, got {text!r} "
                "(e.g. --budget epochs=2,width=1,subset=5000)"
            )
        values[key] = int(value)
    return dataclasses.replace(BUDGETS["default"], **values)


#: The budget of each run mode when ``--budget`` is not given.
MODE_BUDGET = {"smoke": "smoke", "quick": "quick", "full": "default"}


#: Where CIFAR-10 is looked for without ``--data-dir`` (the last one: ``data/`` in the clone).
CANDIDATE_DATA_DIRS = ("./data", "~/data", "~/.cache/cifar10", "/data", "/datasets",
                       str(_ROOT / "data"))


def _shown(candidate: str) -> str:
    """How a candidate folder is named in the report: never an absolute path of the clone."""
    return "data/ in the clone" if candidate == str(_ROOT / "data") else candidate


def find_cifar(data_dir: str | None) -> str | None:
    """The first folder holding ``cifar-10-batches-py/`` or the official tarball."""
    candidates = [data_dir] if data_dir else list(CANDIDATE_DATA_DIRS)
    for c in candidates:
        d = Path(os.path.expanduser(c))
        if (d / "cifar-10-batches-py").is_dir() or (d / "cifar-10-python.tar.gz").is_file():
            return str(d)
    return None


def where_found(data_dir: str | None, found: str) -> str:
    """The found folder as the report names it: the flag, or the default candidate's name."""
    if data_dir:
        return "the folder given by --data-dir"
    for c in CANDIDATE_DATA_DIRS:
        if str(Path(os.path.expanduser(c))) == found:
            return _shown(c)
    return "a default folder"


def cifar_config(kind: str, budget: Budget, data_dir: str,
                 threads: int | None = None) -> argparse.Namespace:
    """The examples' configuration (:func:`examples.cli.make_config`) of one CIFAR run:
    the budget's WideResNet and subset (the first ``subset`` training and ``test_subset``
    test images), the section's hyperparameters (:data:`LR`, :data:`MOMENTUM`,
    :data:`WEIGHT_DECAY`, :data:`RHO`, :data:`ASAM_RHO`), cosine schedule, no label
    smoothing, the examples' augmentation, seed 0. ``kind`` is ``SGD``, ``SAM``, ``ASAM`` or
    a name of ``examples/optimizers.py`` (its default rho; MomentumSAM's 0.3)."""
    from examples.cli import make_config

    name = kind.lower()
    rho = {"sam": RHO, "asam": ASAM_RHO, "msam": 0.3}.get(name)
    return make_config(
        dataset="cifar10", data_dir=data_dir, depth=budget.depth, width=budget.width,
        epochs=budget.epochs, batch_size=budget.batch, limit_train=budget.subset,
        limit_test=budget.test_subset, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
        schedule="cosine", label_smoothing=0.0, optimizer=name, rho=rho, eval_batch_size=500,
        threads=threads, seed=0)


def train_torch(kind: str, budget: Budget, data_dir: str, progress: Any = None,
                threads: int | None = None) -> dict[str, Any]:
    """One torch run through :func:`examples.train_torch.train_model`:
    ``{"history": [{"epoch", "test_loss", "test_acc", ...}], "seconds", "model"}``."""
    from examples import train_torch as trainer

    config = cifar_config(kind, budget, data_dir, threads)
    with _epoch_bar(progress, budget.epochs, f"torch {kind}") as tick:
        t0 = time.perf_counter()
        history, model = trainer.train_model(config, tick)
    return {"history": history, "seconds": time.perf_counter() - t0, "model": model}


def train_jax(kind: str, budget: Budget, data_dir: str, progress: Any = None) -> dict[str, Any]:
    """One JAX run through :func:`examples.train_jax.train`: ``{"history", "seconds"}``."""
    from examples import train_jax as trainer

    config = cifar_config(kind, budget, data_dir)
    with _epoch_bar(progress, budget.epochs, f"jax {kind}") as tick:
        t0 = time.perf_counter()
        history = trainer.train(config, tick)
    return {"history": history, "seconds": time.perf_counter() - t0}


def loss_landscape(model: torch.nn.Module, split: Any, data: Any, alphas: np.ndarray,
                   seed: int = 0) -> list[float]:
    """Loss along a filter-normalized random direction (Li et al., NeurIPS 2018), through
    :func:`sam_torch.diagnostics.loss_landscape` (eval mode, biases and batch-norm parameters
    not moved) over the whole ``split`` in batches of 500: :math:`L(w + \\alpha d)` at
    ``alphas`` (evenly spaced)."""
    from sam_torch import diagnostics

    device = next(model.parameters()).device
    batches = [(torch.from_numpy(data.to_nchw(xb)).to(device), torch.from_numpy(yb).to(device))
               for xb, yb in data.batches(split, 500)]
    landscape = diagnostics.loss_landscape(
        model, F.cross_entropy, batches, dims=1, steps=len(alphas),
        span=(float(alphas[0]), float(alphas[-1])), seed=seed,
    )
    return [float(v) for v in landscape.loss]


def run(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    """CIFAR-10 when found (:func:`run_cifar`), else the digits with label noise
    (:func:`run_digits`)."""
    data_dir = config.get("data_dir")
    found = find_cifar(data_dir)
    if found is None:
        where = ("the folder given by --data-dir" if data_dir
                 else ", ".join(_shown(c) for c in CANDIDATE_DATA_DIRS))
        why = (f"CIFAR-10 not found (looked in {where}), so this section ran scikit-learn's "
               "bundled digits, which need no download. For CIFAR-10 put "
               "cifar-10-batches-py/ or cifar-10-python.tar.gz in a folder and run "
               "python benchmarks/compare.py --data-dir FOLDER")
        return run_digits(config, progress, why)
    return run_cifar(config, progress, found)


def run_cifar(config: Mapping[str, Any], progress: Any, found: str) -> dict[str, Any]:
    """SGD, SAM, ASAM (and the ``optimizers`` variants, torch) on a CIFAR-10 subset through
    the examples' training functions, both backends, and the loss landscape of the torch
    SGD and SAM solutions."""
    from examples import data

    budget = config.get("budget") or BUDGETS[MODE_BUDGET[config.get("mode", "quick")]]
    threads = config.get("threads")
    runs: dict[str, Any] = {}
    models = {}
    extra = [o for o in config.get("optimizers", ()) if o not in ("sgd", "sam", "asam")]
    for kind in ("SGD", "SAM", "ASAM", *extra):
        r = train_torch(kind, budget, found, progress, threads)
        models[kind] = r.pop("model")
        runs[f"torch {kind}"] = r
        _log(progress, f"  torch {kind}: {_last(r)} ({r['seconds']:.0f} s)")
    if not jax_unavailable(config):
        for kind in ("SGD", "SAM", "ASAM"):
            r = train_jax(kind, budget, found, progress)
            runs[f"jax {kind}"] = r
            _log(progress, f"  jax {kind}: {_last(r)} ({r['seconds']:.0f} s)")
    mode = config.get("mode", "quick")
    # the smoke run (seconds: the tests) takes the curve through 0 on a small probe
    alphas = np.linspace(-1.0, 1.0, {"full": 21, "smoke": 5}.get(mode, 11))
    n_probe = {"full": 1000, "smoke": 128}.get(mode, 500)
    train = data.load_training_data(cifar_config("SGD", budget, found)).train
    probe = data.Split(train.images[:n_probe], train.labels[:n_probe])
    landscape = {k: loss_landscape(models[k], probe, data, alphas)
                 for k in progress(("SGD", "SAM"), desc="loss landscape")}
    return {"dataset": "cifar10", "data": where_found(config.get("data_dir"), found),
            "budget": dataclasses.asdict(budget), "runs": runs,
            "landscape": {"alphas": alphas.tolist(), "train_loss": landscape,
                          "model": "torch", "probe_images": len(probe)}}


#: The digits runs of each mode: ``(seeds, epochs)``; ``None`` epochs: the label-noise
#: study's (:data:`benchmarks.label_noise.DATASET_SETTINGS`).
DIGITS_RUNS: dict[str, tuple[tuple[int, ...], int | None]] = {
    "smoke": ((0,), 2),
    "quick": ((0,), 10),
    "full": ((0, 1, 2), None),
}
#: The optimizers of the digits runs (the study's names; ``sam/m16``: m-sharpness 16).
DIGITS_OPTIMIZERS = ("sgd", "sam", "sam/m16")


def run_digits(config: Mapping[str, Any], progress: Any, why: str) -> dict[str, Any]:
    """SGD, SAM and m-SAM (m = 16) on scikit-learn's digits with 40 % symmetric label noise,
    in the label-noise study's settings (:mod:`benchmarks.label_noise`: its rho per
    optimizer, learning rate, schedule, batch; fewer epochs and seeds in the quick and
    smoke runs, :data:`DIGITS_RUNS`), each run through the examples' training function of
    its backend (:func:`benchmarks.label_noise.execute`)."""
    from benchmarks import label_noise as study

    settings = study.DATASET_SETTINGS["digits"]
    seeds, epochs = DIGITS_RUNS[config.get("mode", "quick")]
    overrides = {} if epochs is None else {"epochs": epochs}
    wanted = config.get("backends", ("torch", "jax"))
    backends = [b for b in ("torch", "jax")
                if b in wanted and (b == "torch" or not jax_unavailable(config))]
    optimizers = [study.parse_optimizer(o) for o in DIGITS_OPTIMIZERS]
    specs = study.plan_runs(settings, optimizers, list(seeds), backends, overrides=overrides)
    runs: dict[str, Any] = {}
    records = []
    for spec in progress(specs, desc="digits runs", unit="run"):
        with _one_torch_thread():
            record = study.execute(spec, threads=None, measure=False)
        name = f"{spec.backend} {spec.optimizer.display}"
        name += f" seed {spec.seed}" if len(seeds) > 1 else ""
        runs[name] = {"history": record["history"], "seconds": record["wall_s"]}
        records.append({k: v for k, v in record.items() if k != "history"})
        _log(progress, f"  {name}: test acc {record['final_test_acc']:.4f}, noisy_fit "
                       f"{record['noisy_fit']:.4f} ({record['wall_s']:.0f} s)")
    run_settings = {**settings["config"], **overrides}
    return {"dataset": "digits", "data": "scikit-learn's bundled digits", "why": why,
            "settings": run_settings, "study_epochs": settings["config"]["epochs"],
            "seeds": list(seeds), "backends": backends,
            "rho": {s.optimizer.display: s.rho for s in specs if s.optimizer.name != "sgd"},
            "runs": runs, "records": records,
            "summary": study.summarize(records, kind="all")}


def report(result: dict[str, Any]) -> list[str]:
    """The section's part of ``report.md``."""
    from benchmarks.report import _table

    if result.get("dataset") == "digits":
        return _digits_report(result)
    md = [f"CIFAR-10 from {result['data']}, budget {result['budget']}: the examples' "
          "training functions (`examples.train_torch.train_model`, "
          "`examples.train_jax.train`), cosine learning rate, no label smoothing, the first "
          "`subset` training and `test_subset` test images.", "", _table(
              ["run", "final test acc", "final test loss", "seconds"],
              [[n, f"{r['history'][-1]['test_acc']:.4f}",
                f"{r['history'][-1]['test_loss']:.4f}", f"{r['seconds']:.0f}"]
               for n, r in result["runs"].items()]), ""]
    ls = result["landscape"]["train_loss"]
    md += ["Loss-landscape sharpness proxy (train loss at alpha = +-1 minus at 0): " +
           ", ".join(f"{k}: {0.5 * (v[0] + v[-1]) - v[len(v) // 2]:.3f}"
                     for k, v in ls.items()), ""]
    return md


def _digits_report(result: dict[str, Any]) -> list[str]:
    from benchmarks.report import _table

    s = result["settings"]
    seeds = result["seeds"]
    epochs_note = ("the study's epochs" if s["epochs"] == result["study_epochs"] else
                   f"the study runs {result['study_epochs']}; `--full` runs those, with "
                   "3 seeds")
    md = [f"**Dataset: scikit-learn's digits with {100 * s['label_noise']:.0f} % symmetric "
          f"label noise.** {result['why']}.", "",
          f"Settings of the label-noise study (`python -m benchmarks.label_noise --dataset "
          f"digits`): small CNN, {s['epochs']} epochs ({epochs_note}), batch "
          f"{s['batch_size']}, lr {s['lr']} with a {s['schedule']} schedule, momentum "
          f"{s['momentum']}, weight decay {s['weight_decay']}, no label smoothing; rho: "
          + ", ".join(f"{k} {v}" for k, v in result["rho"].items())
          + (f", ramped linearly from 0 over the first {s['rho_warmup_epochs']:g} epochs"
             if s.get("rho_warmup_epochs") else "")
          + f"; {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
          f"({', '.join(map(str, seeds))}), backends {', '.join(result['backends'])}, one "
          "torch thread. "
          "Test labels are clean; `noisy_fit` is the fraction of the flipped training "
          "examples the model predicts as their wrong label (memorized noise).", "",
          _table(["backend", "optimizer", "final test acc %", "best test acc %",
                  "noisy_fit %", "seconds"],
                 [[row["backend"], row["label"], _pct(row["final_test_acc"], seeds),
                   _pct(row["best_test_acc"], seeds), _pct(row["noisy_fit"], seeds),
                   f"{_seconds(result, row):.0f}"] for row in result["summary"]]), ""]
    if len(seeds) > 1:
        md += ["Mean ± sample standard deviation over the seeds.", ""]
    return md


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Issue targets on the digits in the study's settings (full run): SAM >= SGD + 5 points
    of final test accuracy and m-SAM >= SAM, per backend (means over the seeds)."""
    if result.get("dataset") != "digits" or result["settings"]["epochs"] != result[
            "study_epochs"]:
        return []
    checks: list[tuple[str, str, bool | None]] = []
    for backend in result["backends"]:
        acc = {(r["optimizer"], r["m_sharpness"]): r["final_test_acc"][0]
               for r in result["summary"] if r["backend"] == backend}
        sgd, sam, msam = acc.get(("sgd", None)), acc.get(("sam", None)), acc.get(("sam", 16))
        if sgd is not None and sam is not None:
            checks.append((f"digits, 40 % noise, {backend}: SAM >= SGD + 5 points",
                           f"{100 * sam:.1f} vs {100 * sgd:.1f}", sam >= sgd + 0.05))
        if sam is not None and msam is not None:
            checks.append((f"digits, 40 % noise, {backend}: m-SAM (m=16) >= SAM",
                           f"{100 * msam:.1f} vs {100 * sam:.1f}", msam >= sam))
    return checks


def _pct(ms: Any, seeds: list[int]) -> str:
    """A ``(mean, std)`` fraction in percent (the mean alone for one seed)."""
    if ms is None:
        return "–"
    return f"{100 * ms[0]:.1f}" if len(seeds) == 1 else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def _seconds(result: dict[str, Any], row: dict[str, Any]) -> float:
    """Mean wall time of a summary row's runs."""
    walls = [r["wall_s"] for r in result["records"]
             if (r["backend"], r["optimizer"], r["m_sharpness"]) ==
             (row["backend"], row["optimizer"], row["m_sharpness"])]
    return sum(walls) / len(walls) if walls else 0.0


def _last(run: dict[str, Any]) -> str:
    h = run["history"][-1]
    return f"epoch {h['epoch']}: test acc {h['test_acc']:.4f}, test loss {h['test_loss']:.4f}"


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One torch thread for the digits' tiny CNN (as the label-noise study runs it: more
    threads only add overhead to its 8x8 convolutions), the run's setting restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _epoch_bar(progress: Any, epochs: int, desc: str) -> Iterator[Callable[[Any], None]]:
    """An epoch bar, as the callback the examples' ``train`` calls after each epoch."""
    if progress is None:
        yield lambda _metrics: None
        return
    bar = progress(total=epochs, desc=desc, unit="epoch")
    try:
        yield lambda _metrics: bar.update()
    finally:
        bar.close()


def _log(progress: Any, message: str) -> None:
    if progress is None:
        print(message, flush=True)
    else:
        progress.write(message)
