"""SAM's generalization gain under label noise, in both backends (the label-noise study).

    python -m benchmarks.label_noise --dataset digits                     # minutes on a CPU
    python -m benchmarks.label_noise --dataset digits --sweep-rho         # justify rho
    python -m benchmarks.label_noise --dataset cifar10 --data-dir DATA    # a CIFAR-10 subset
    python -m benchmarks.label_noise --preset foret-table4 --data-dir DATA   # on a GPU

A fraction of the training labels (40 % by default) is flipped to a uniformly drawn other
class (:func:`examples.data.label_noise`, the same labels for every run: ``noise_seed`` is
fixed); the test labels stay clean. Every optimizer gets the same data, epochs and learning
rate schedule; each run is one call of :func:`examples.train_torch.train` or
:func:`examples.train_jax.train` (the examples' training loops), in a worker process with one
thread, ``--jobs`` at a time. Per epoch the runs record the test accuracy, ``noisy_fit``
(the fraction of flipped training examples the model predicts as their noisy label: memorized
noise) and ``clean_fit`` (the fraction of the other training examples predicted correctly),
both in eval mode on the training set.

Each dataset's settings (:data:`DATASET_SETTINGS`) fix rho per optimizer form (and per noise
level where the sweep asked for it) and, on the digits, a linear rho ramp over the first 5
epochs (``rho_warmup_epochs``: without it a large rho sends the fresh CNN to the constant
predictor); ``--rho`` and ``--set`` override them for one invocation.

Optimizers are registry names of :mod:`examples.optimizers`, optionally with ``/mM`` for
m-sharpness (``sam/m16``: SAM whose perturbation is computed per chunk of 16 examples,
:func:`sam_torch.m_sharpness_step` and its JAX counterpart).

Output (``--out``, default ``benchmarks/results/label-noise``): ``results.json`` (every run
with its history and the settings; accuracies as fractions), ``report.md`` (mean ± std over
seeds per dataset, backend and optimizer, the target checks, the rho sweep, the commands and
the hardware) and ``curves-<dataset>.png`` (test accuracy and ``noisy_fit`` per epoch, mean
over seeds). Invocations merge into the same ``results.json`` (also when they run at the
same time: each finished run is merged into the file under a lock): a run whose key
(dataset, backend, optimizer, m, rho, rho ramp, seed, noise, epochs, training-set size) is
already there when the invocation starts is **skipped**, unless ``--replace`` is given, in
which case it is run again and replaces the old record. ``--missing-measures`` reruns the
recorded runs whose records lack the sharpness measures (those recorded before the measures
existed), each at its own recorded settings, and replaces them: the grid's runs first.
``--report-only`` rewrites the report and plots from ``results.json``.

References: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021 (Table 4: label noise; Fig. 3: m-sharpness); Baek, Kolter &
Raghunathan, "Why is SAM Robust to Label Noise?", ICLR 2024.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks._timing import limit_threads_env, machine_info

__all__ = [
    "BUDGETS",
    "DATASET_SETTINGS",
    "PRESETS",
    "OptimizerSpec",
    "RunSpec",
    "budget_lines",
    "cheap_form_targets",
    "form_options",
    "gain_share",
    "in_grid",
    "main",
    "merge_runs",
    "parse_optimizer",
    "parse_settings",
    "pass_rates",
    "plan_runs",
    "plot_pareto",
    "rho_for",
    "rho_warmup_of",
    "run_key",
    "summarize",
    "wall_time_ratios",
    "write_report",
]

OUT = Path(__file__).resolve().parent / "results" / "label-noise"
JAX_M_IMPL = "vectorized"
DEFAULT_OPTIMIZERS = ("sgd", "sam", "sam/m16", "asam")

#: The settings of each dataset: :func:`examples.cli.make_config` overrides shared by every
#: optimizer, and ``rho`` per optimizer form (chosen by the sweep in the report).
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {
        "config": {
            "dataset": "digits",
            "epochs": 40,
            "batch_size": 128,
            "lr": 0.05,
            "schedule": "cosine",
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "label_smoothing": 0.0,
            "label_noise": 0.4,
            # rho ramps from 0 over the first 5 of 40 epochs (SAM-family forms only). With
            # rho at full size from the first step, a fresh network goes to the constant
            # predictor before it learns anything once rho passes a threshold (SAM 0.2,
            # m-SAM 0.085: 10.8 % test accuracy, train loss log 10 from epoch 1), which capped
            # m-SAM below SAM's best; the runs without the ramp stay in the sweep table.
            "rho_warmup_epochs": 5.0,
        },
        # The best final accuracy of each form's sweep with the ramp (the report's sweep
        # table): SAM 0.2 and m-SAM 0.2 (0.1 leaves a quarter / a tenth of the noise
        # memorized, 0.3 is unstable across seeds, 0.4 does not train).
        "rho": {"sam": 0.2, "sam/m": 0.2, "asam": 1.0, "everyk": 0.2, "looksam": 0.1,
                "msam": 0.3, "bsam": 0.05, "aesam": 0.2, "esam": 0.05, "gsam": 0.2},
        # GSAM (alpha 0.2, its default): the best of its sweep with the ramp, 0.1 / 0.2 / 0.3
        # (0.3 sends a seed to the constant predictor).
        # BSAM: rho 0.05 (its default), not swept; no ramp (NO_RHO_RAMP).
        # AE-SAM: SAM's rho, with the ramp, not swept yet (its SAM steps are SAM's).
        # ESAM (beta = gamma = 0.5): the best of its sweep, 0.05 / 0.1 / 0.2 with the ramp
        # (0.1 and 0.2 end at the constant predictor; it perturbs with rho / beta).
        # A form's own knobs in the grid (--k / --alpha): LookSAM's alpha from its sweep at
        # rho 0.1 (the paper's 0.7 stays near the constant predictor here, docs/variants.md)
        "form_options": {"looksam": {"alpha": 0.3}},
        # Other noise levels (`--label-noise`): the more labels are flipped, the smaller the
        # loss gap between a classifier and the constant predictor, and the smaller the rho
        # at which SAM prefers the latter; each level's rho is the best of its own sweep
        # (20 %: not swept, 40 %'s values).
        "rho_by_noise": {
            0.6: {"sam": 0.15, "sam/m": 0.15, "asam": 1.0, "aesam": 0.15, "esam": 0.15},
            0.8: {"sam": 0.03, "sam/m": 0.03, "asam": 0.5, "aesam": 0.03, "esam": 0.03},
        },
        "sweep": {
            "sam": (0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
            "sam/m16": (0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
            "asam": (0.5, 1.0, 1.5, 2.0),
            "gsam": (0.1, 0.2, 0.3),
            "esam": (0.05, 0.1, 0.2),
        },
    },
    "cifar10": {
        "config": {
            "dataset": "cifar10",
            "depth": 16,
            "width": 1,
            "no_augment": True,
            "limit_train": 1024,
            "limit_test": 1000,
            "epochs": 30,
            "batch_size": 64,
            "lr": 0.05,
            "schedule": "cosine",
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "label_smoothing": 0.0,
            "label_noise": 0.4,
        },
        # The best final accuracy of each form's sweep: SAM 0.2 (at 0.1 it still memorizes
        # ~98 % of the flipped labels), m-SAM 0.1 (0.05 memorizes ~95 %, 0.2 over-
        # regularizes), ASAM 1.0 (0.5 memorizes all of them). No rho ramp: rho 0.2 trains
        # from the first step here, and a 5-epoch ramp made SAM worse (less regularization
        # early; the sweep table's warm-up row).
        # The other forms' sweeps (seed 0, the report's sweep table) started from SAM's rho
        # 0.2 (ESAM half of it, as it perturbs with rho / beta, beta 0.5); a form's grid rho
        # moves to its sweep's best when that beats it by more than two of the grid's seed
        # sds: AE-SAM 0.4 (29.0 % against 22.0 % at 0.2 on seed 0, the flipped labels
        # memorized at 0.1-0.2: it needs a larger rho for its fewer SAM steps). Kept: every-k
        # 0.2 (0.1 / 0.2 / 0.4: 24.2 / 25.3 / 25.0), Momentum-SAM 0.2 (21.9 / 23.0 / 21.6),
        # GSAM 0.2 (27.3 / 30.7 / 22.8), ESAM 0.1 (0.05 / 0.1 / 0.2: 24.7 / 23.7 / 20.5),
        # LookSAM 0.2 at alpha 0.3 (0.3: 30.4 / 28.7 %, within its seeds' spread) with its
        # alpha from its own sweep (0.3 / 0.5 / 0.7). BSAM: its default 0.05, not swept.
        "rho": {"sam": 0.2, "sam/m": 0.1, "asam": 1.0, "aesam": 0.4, "esam": 0.1,
                "bsam": 0.05, "looksam": 0.2, "everyk": 0.2, "msam": 0.2, "gsam": 0.2},
        "form_options": {"looksam": {"alpha": 0.3}},
        # Every form's rho swept on seed 0 (the report's sweep table; LookSAM at its grid
        # alpha 0.3, passed with --set alpha=0.3 as a sweep takes the forms' defaults).
        "sweep": {
            "sam": (0.1, 0.2),
            "sam/m16": (0.05, 0.1, 0.2),
            "asam": (0.5, 1.0),
            "looksam": (0.2, 0.3),
            "everyk": (0.1, 0.2, 0.4),
            "msam": (0.1, 0.2, 0.4),
            "gsam": (0.1, 0.2, 0.3),
            "aesam": (0.1, 0.2, 0.4),
            "esam": (0.05, 0.1, 0.2),
        },
    },
}

#: Configurations for a GPU (not run on a CPU): ``--preset NAME`` replaces the dataset's
#: settings; ``noise_levels`` are run one after another.
PRESETS: dict[str, dict[str, Any]] = {
    # Foret et al., Table 4: CIFAR-10 with 20-80 % symmetric noise, 200 epochs. Their model
    # is a ResNet-32; the examples ship WideResNets, so WRN-16-8 stands in for it.
    "foret-table4": {
        "config": {
            "dataset": "cifar10",
            "depth": 16,
            "width": 8,
            "epochs": 200,
            "batch_size": 128,
            "lr": 0.1,
            "schedule": "cosine",
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "label_smoothing": 0.0,
        },
        "noise_levels": (0.2, 0.4, 0.6, 0.8),
        "rho": {"sam": 0.1, "sam/m": 0.05, "asam": 1.0},
        "sweep": {"sam": (0.05, 0.1, 0.2), "sam/m16": (0.02, 0.05, 0.1)},
    },
    # The clean WRN-16-8 setup of the seed table (the examples' defaults: step schedule,
    # label smoothing 0.1, crop + flip + Cutout).
    "wrn16-8-clean": {
        "config": {
            "dataset": "cifar10",
            "depth": 16,
            "width": 8,
            "epochs": 200,
            "batch_size": 128,
            "lr": 0.1,
            "schedule": "step",
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "label_smoothing": 0.1,
        },
        "noise_levels": (0.0,),
        "rho": {"sam": 0.05, "sam/m": 0.05, "asam": 0.5},
        "sweep": {"sam": (0.02, 0.05, 0.1)},
    },
}


@dataclass(frozen=True)
class OptimizerSpec:
    """A registry name with an optional m-sharpness chunk size (``"sam/m16"``)."""

    name: str
    m: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.m is None else f"{self.name}/m{self.m}"

    @property
    def rho_key(self) -> str:
        return self.name if self.m is None else f"{self.name}/m"

    @property
    def display(self) -> str:
        base = {
            "sgd": "SGD", "sam": "SAM", "asam": "ASAM", "looksam": "LookSAM",
            "everyk": "every-k SAM", "msam": "Momentum-SAM", "gsam": "GSAM",
            "bsam": "BSAM", "aesam": "AE-SAM", "esam": "ESAM", "mesa": "MESA", "saf": "SAF",
        }.get(self.name, self.name)
        return base if self.m is None else f"m-{base} (m={self.m})"


def parse_optimizer(text: str) -> OptimizerSpec:
    """``"sam"`` -> SAM; ``"sam/m16"`` -> SAM with m-sharpness 16 (validated names)."""
    from examples.cli import optimizer_names

    name, _, rest = text.strip().partition("/")
    if name not in optimizer_names():
        raise ValueError(f"optimizer must be one of {optimizer_names()}, got {name!r}")
    if not rest:
        return OptimizerSpec(name)
    if not rest.startswith("m") or not rest[1:].isdigit() or int(rest[1:]) < 1:
        raise ValueError(f"an m-sharpness suffix is '/m' and a positive integer, got {text!r}")
    if name in NO_RHO:
        raise ValueError(f"m-sharpness needs a SAM-family optimizer, got {text!r}")
    return OptimizerSpec(name, int(rest[1:]))


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    dataset: str
    backend: str
    optimizer: OptimizerSpec
    seed: int
    rho: float
    config: tuple[tuple[str, Any], ...]  # make_config overrides (hashable)
    kind: str = "grid"  # "grid" or "sweep"

    def overrides(self) -> dict[str, Any]:
        from examples.cli import FORM_OPTIONS

        values = dict(self.config)
        if self.optimizer.name in NO_RHO_RAMP:
            values.pop("rho_warmup_epochs", None)
        for flag, forms in FORM_OPTIONS.items():  # --set k=..., alpha=...: the forms' own
            if self.optimizer.name not in forms:
                values.pop(flag, None)
        values.update(
            optimizer=self.optimizer.name,
            m_sharpness=self.optimizer.m,
            rho=self.rho,
            seed=self.seed,
        )
        return values

    def key(self) -> tuple[Any, ...]:
        c = dict(self.config)
        return run_key(
            {
                "form_options": form_options(self.optimizer.name, c),
                "dataset": self.dataset,
                "backend": self.backend,
                "optimizer": self.optimizer.name,
                "m_sharpness": self.optimizer.m,
                "rho": self.rho,
                "rho_warmup_epochs": c.get("rho_warmup_epochs", 0.0),
                "seed": self.seed,
                "label_noise": c.get("label_noise", 0.0),
                "epochs": c["epochs"],
                "n_train": c.get("limit_train"),
            }
        )


def form_options(optimizer: str, values: dict[str, Any]) -> dict[str, Any]:
    """The form's own knobs (``k``, ``alpha``: :data:`examples.cli.FORM_OPTIONS`) that
    ``values`` (a run's settings) set to something other than the form's default; ``{}`` for
    a form at its defaults (the records before the knobs existed)."""
    from examples.cli import FORM_OPTIONS

    return {
        flag: values[flag]
        for flag, defaults in sorted(FORM_OPTIONS.items())
        if optimizer in defaults
        and values.get(flag) is not None
        and values[flag] != defaults[optimizer]
    }


def _options_text(options: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted((options or {}).items()))
#: Optimizers without a rho: SGD, and SAF and MESA (a trajectory loss, no perturbation).
#: Their runs are keyed, planned and shown with rho 0 (a rho in a record means nothing).
NO_RHO = ("sgd", "saf", "mesa")
#: Optimizers that run without the rho ramp: those without a rho; BSAM's ascent step
#: rho g / s is scaled by its precision, not normalized, and was run without it.
NO_RHO_RAMP = (*NO_RHO, "bsam")


def rho_warmup_of(run: dict[str, Any]) -> float:
    """A run's rho warm-up in epochs (0 for SGD and BSAM, and for records without the field)."""
    if run["optimizer"] in NO_RHO_RAMP:
        return 0.0
    return round(float(run.get("rho_warmup_epochs") or 0.0), 6)


def run_key(run: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a run in ``results.json`` (the rho of SGD, SAF and MESA does not
    matter: 0)."""
    rho = 0.0 if run["optimizer"] in NO_RHO else round(float(run["rho"]), 6)
    return (
        run["dataset"],
        run["backend"],
        run["optimizer"],
        run["m_sharpness"],
        rho,
        rho_warmup_of(run),
        int(run["seed"]),
        round(float(run["label_noise"]), 6),
        int(run["epochs"]),
        run.get("n_train"),
        tuple(sorted((run.get("form_options") or {}).items())),
    )


def merge_runs(
    existing: list[dict[str, Any]], new: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``existing`` with every run of ``new`` added; a new run replaces an existing one with
    the same :func:`run_key` (the caller skips planned runs it does not want to replace)."""
    merged = {run_key(r): r for r in existing}
    for r in new:
        merged[run_key(r)] = r
    return list(merged.values())


def rho_for(settings: dict[str, Any], key: str, noise: float) -> float | None:
    """The grid's rho of an optimizer form (``"sam"``, ``"sam/m"``, ...) at a noise level:
    a ``--rho`` override, else the level's entry of ``rho_by_noise``, else ``rho``; ``None``
    when the settings name none."""
    tables = (
        settings.get("rho_override", {}),
        settings.get("rho_by_noise", {}).get(round(float(noise), 6), {}),
        settings["rho"],
    )
    for table in tables:
        if key in table:
            return float(table[key])
    return None


def settings_for(dataset: str, preset: str | None) -> dict[str, Any]:
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        return PRESETS[preset]
    if dataset not in DATASET_SETTINGS:
        raise ValueError(f"dataset must be one of {sorted(DATASET_SETTINGS)}, got {dataset!r}")
    return DATASET_SETTINGS[dataset]


def plan_runs(
    settings: dict[str, Any],
    optimizers: list[OptimizerSpec],
    seeds: list[int],
    backends: list[str],
    *,
    overrides: dict[str, Any] | None = None,
    sweep: bool = False,
    noise_levels: Iterable[float] | None = None,
) -> list[RunSpec]:
    """The runs of a grid (each optimizer at its dataset's rho) or of a rho sweep (the
    sweep's optimizer forms that are in ``optimizers``, at each of their rhos), seeds
    inner, so that an interrupted study has whole seeds of the first optimizers."""
    base = {**settings["config"], **(overrides or {})}
    levels = list(noise_levels or settings.get("noise_levels") or (base["label_noise"],))
    runs = []
    for noise in levels:
        config = {**base, "label_noise": float(noise)}
        if sweep:  # the sweep's forms that are among ``optimizers``
            wanted = {o.label for o in optimizers}
            forms = [
                (parse_optimizer(k), tuple(v))
                for k, v in settings["sweep"].items()
                if k in wanted
            ]
        else:
            forms = [(o, (rho_for(settings, o.rho_key, noise) or 0.05,)) for o in optimizers]
        for backend in backends:
            for opt, rhos in forms:
                # the grid's knobs of the form, unless the invocation sets them (--set)
                own = {
                    k: v
                    for k, v in settings.get("form_options", {}).get(opt.label, {}).items()
                    if not sweep and k not in (overrides or {})
                }
                for rho in rhos:
                    for seed in seeds:
                        runs.append(
                            RunSpec(
                                config["dataset"],
                                backend,
                                opt,
                                seed,
                                0.0 if opt.name in NO_RHO else float(rho),
                                tuple(sorted({**config, **own}.items())),
                                "sweep" if sweep else "grid",
                            )
                        )
    return runs


def missing_measures_plan(
    runs: list[dict[str, Any]],
    *,
    datasets: Iterable[str] | None = None,
    backends: Iterable[str] | None = None,
    noise_levels: Iterable[float] | None = None,
    optimizers: Iterable[str] | None = None,
    data_dir: str | None = None,
) -> list[RunSpec]:
    """The reruns of the recorded runs whose records lack the sharpness measures
    (:data:`MEASURE_KEYS`; runs recorded before the measures existed), each at its own
    recorded settings (the dataset's current settings under the record's, its rho, rho ramp,
    knobs and seed), so that its rerun has the record's :func:`run_key` and replaces it.

    ``datasets``, ``backends``, ``noise_levels`` and ``optimizers`` (labels, ``"sam/m16"``)
    keep only those runs (``None``: all). The grid's runs (:func:`in_grid`) come first, then
    the others; each group seed by seed, so SGD's reruns, the baseline of the time ratios,
    spread over the invocation."""
    wanted_noise = None if noise_levels is None else {round(float(n), 6) for n in noise_levels}
    wanted_opt = None if optimizers is None else {o.strip() for o in optimizers}
    plan = []
    for run in runs:
        if all(run.get(k) is not None for k in MEASURE_KEYS):
            continue
        opt = OptimizerSpec(run["optimizer"], run.get("m_sharpness"))
        if (datasets is not None and run["dataset"] not in datasets) or (
            backends is not None and run["backend"] not in backends
        ) or (wanted_noise is not None and round(float(run["label_noise"]), 6) not in wanted_noise
              ) or (wanted_opt is not None and opt.label not in wanted_opt):
            continue
        base = dict(DATASET_SETTINGS.get(run["dataset"], {}).get("config", {}))
        config = {**base, **run.get("settings", {}), **(run.get("form_options") or {})}
        config["rho_warmup_epochs"] = rho_warmup_of(run)
        config["label_noise"] = float(run["label_noise"])
        if run.get("n_train") is not None:
            config["limit_train"] = run["n_train"]
        if config.get("dataset") != "digits" and data_dir is not None:
            config["data_dir"] = data_dir
        spec = RunSpec(run["dataset"], run["backend"], opt, int(run["seed"]),
                       0.0 if opt.name in NO_RHO else float(run["rho"]),
                       tuple(sorted(config.items())), run.get("kind", "grid"))
        if spec.key() != run_key(run):  # a record this code cannot reproduce: leave it
            continue
        plan.append((not in_grid(run), spec.seed, len(plan), spec))
    return [spec for *_, spec in sorted(plan, key=lambda t: t[:3])]


def _single_thread_env() -> None:
    """One thread per run: for the worker processes and the command line, before torch/JAX
    start (never inside a process that already runs them, e.g. the tests)."""
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    limit_threads_env(1)


def pass_rates(history: list[dict[str, Any]]) -> dict[str, float]:
    """A run's passes per optimizer step over all its epochs, from the loops' per-epoch
    counts: ``passes_per_step`` (forward-backward passes over a batch) and
    ``forwards_per_step`` (forwards without backward), each weighted by the epoch's steps
    (``passes / passes_per_step``), rounded to 4 digits."""
    steps = [h["passes"] / h["passes_per_step"] for h in history]
    total = sum(steps)
    return {
        "passes_per_step": round(sum(h["passes"] for h in history) / total, 4),
        "forwards_per_step": round(
            sum(h.get("forwards_per_step", 0.0) * n for h, n in zip(history, steps, strict=True))
            / total, 4,
        ),
    }


def execute(spec: RunSpec, threads: int | None = 1, *, measure: bool = True) -> dict[str, Any]:
    """Train one run (in this process) and return its ``results.json`` record; ``measure``:
    with the final model's sharpness measures (:func:`sharpness_measures`; the main job's
    accuracy section leaves them out, it has a few minutes in all)."""
    from examples.cli import make_config

    values = spec.overrides()
    if spec.backend == "torch":
        values["threads"] = threads
        from examples import train_torch as trainer
    elif spec.backend == "jax":
        from examples import train_jax as trainer  # type: ignore[no-redef]
    else:
        raise ValueError(f"backend must be 'torch' or 'jax', got {spec.backend!r}")
    if spec.backend == "jax" and values.get("m_sharpness"):
        # Measured on the study's CPU: the vmap form runs these small convolutions 1.1x
        # (WRN-16-1) to 5x (digits CNN) faster than the lax.scan form "auto" picks on CPU.
        values.setdefault("m_sharpness_impl", JAX_M_IMPL)
    config = make_config(**values)
    started, started_cpu = time.perf_counter(), time.process_time()
    history, trained = trainer.train_model(config)
    wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    final = history[-1]
    c = dict(spec.config)
    per_step = pass_rates(history)
    measures = sharpness_measures(spec.backend, trained, config) if measure else {}
    return {
        "dataset": spec.dataset,
        "backend": spec.backend,
        "optimizer": spec.optimizer.name,
        "m_sharpness": spec.optimizer.m,
        "seed": spec.seed,
        "label_noise": c.get("label_noise", 0.0),
        "rho": spec.rho,
        "rho_warmup_epochs": float(values.get("rho_warmup_epochs", 0.0)),  # SGD: none
        "kind": spec.kind,
        "epochs": c["epochs"],
        "n_train": c.get("limit_train"),
        "final_test_acc": final["test_acc"],
        "best_test_acc": max(h["test_acc"] for h in history),
        "noisy_fit": final["noisy_fit"],
        "clean_fit": final["clean_fit"],
        "max_noisy_fit": max((h["noisy_fit"] or 0.0) for h in history),
        # Calibration of the final model (examples' loops; BSAM: its predictive's).
        "final_test_ece": final.get("test_ece"),
        "final_test_acc_calibrated": final.get("test_acc_calibrated"),
        "final_train_loss": final["train_loss"],
        "wall_s": round(wall, 1),
        # the epochs' time (training, JAX compilation and the per-epoch evaluation), without
        # the process's start-up (imports, data loading), which the first run of a worker
        # pays alone
        "train_time_s": round(sum(h["epoch_time_s"] for h in history), 2),
        # the CPU time the process spent in training (its data loading included): with one
        # thread per run, what the run costs whatever else shares the machine
        "train_cpu_s": round(cpu, 2),
        # forward-backward passes over a batch per optimizer step, counted by the loop
        "passes_per_step": per_step["passes_per_step"],
        # forwards over a batch without backward per step (not in passes_per_step): ESAM's
        # selection forward, MESA's EMA forward on the epochs with its term
        "forwards_per_step": per_step["forwards_per_step"],
        # train_time_s / the median train_time_s of SGD's runs of the same invocation (same
        # dataset, backend, noise, epochs, data), set as the invocation's runs are recorded
        "wall_time_ratio": None,
        # train_cpu_s / the median train_cpu_s of the same SGD runs (a check on the wall time's
        # ratio that a changing load on the machine does not move)
        "cpu_time_ratio": None,
        "form_options": form_options(spec.optimizer.name, c),
        "settings": {k: v for k, v in c.items() if k != "data_dir"},
        **measures,
        "history": history,
    }


# ---------------------------------------------------------------------------------------
# Sharpness measures of the final models (issue 27: sam_torch/sam_jax.diagnostics)
# ---------------------------------------------------------------------------------------

#: How the final model of every run is measured, on the clean training set in eval mode:
#: lambda_max by 20 Lanczos iterations, the Hessian trace by Hutchinson with 10 probes,
#: worst-case adaptive m-sharpness (Andriushchenko et al., ICML 2023: the measure they found
#: best correlated with generalization) with rho 0.5 in the adaptive ball T_w = |w|, m = 128,
#: 20 ascent steps, and a 1-D filter-normalized landscape; all in the plain cross-entropy.
MEASURES: dict[str, Any] = {
    "lanczos_iterations": 20, "trace_probes": 10, "rho": 0.5, "m": 128, "ascent_steps": 20,
    "landscape_steps": 11, "landscape_span": 1.0, "seed": 0,
}
#: How many of the clean training examples the measures use, per dataset (the first ones of
#: the run's training subset; all of them where a dataset is not named). On the CIFAR-10
#: subset (WRN-16-1, one CPU thread) the measures over all 1024 images took 375-394 s, twice
#: the 175-184 s of SGD's whole training; over the first 256 they cost about a quarter of it.
MEASURE_EXAMPLES: dict[str, int] = {"cifar10": 256}
#: The record keys :func:`sharpness_measures` adds to a run.
MEASURE_KEYS = ("lambda_max", "hessian_trace", "worst_sharpness")


def sharpness_measures(backend: str, trained: Any, config: Any) -> dict[str, Any]:
    """``lambda_max``, ``hessian_trace`` (and its standard error), ``worst_sharpness`` and a
    1-D ``landscape`` of a trained torch model or JAX ``TrainState``, on the run's training
    images with their clean labels (:data:`MEASURES`)."""
    from examples.data import batches, load_training_data, to_nchw

    data = load_training_data(config)
    n = min(MEASURE_EXAMPLES.get(config.dataset, len(data.clean_labels)), len(data.clean_labels))
    clean = type(data.train)(data.train.images[:n], data.clean_labels[:n])
    m = {**MEASURES, "examples": n}
    seed = m["seed"]
    t0 = time.perf_counter()
    if backend == "torch":
        import torch
        import torch.nn.functional as F

        from sam_torch import diagnostics as D

        model = trained
        device = next(model.parameters()).device
        data_batches = [(torch.from_numpy(to_nchw(x)).to(device), torch.from_numpy(y).to(device))
                        for x, y in batches(clean, 500, dataset=config.dataset)]
        args: tuple[Any, ...] = (model, F.cross_entropy, data_batches)
    else:
        import jax.numpy as jnp
        import optax

        from examples.train_jax import _model
        from sam_jax import diagnostics as D  # type: ignore[no-redef]

        net = _model(config.dataset, config.depth, config.width, data.num_classes)
        stats = trained.batch_stats

        def loss_fn(params: Any, batch: Any) -> Any:
            variables = {"params": params, **({"batch_stats": stats} if stats else {})}
            logits = net.apply(variables, batch[0], train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

        data_batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches(clean, 500, dataset=config.dataset)]
        args = (loss_fn, trained.params, data_batches)
    lam = D.hessian_eigenvalues(*args, k=1, max_iter=m["lanczos_iterations"], seed=seed)
    trace = D.hessian_trace(*args, probes=m["trace_probes"], seed=seed)
    worst = D.sharpness(*args, rho=m["rho"], kind="worst", adaptive=True, m=m["m"],
                        steps=m["ascent_steps"], seed=seed)
    line = D.loss_landscape(*args, dims=1, steps=m["landscape_steps"], span=m["landscape_span"],
                            seed=seed)
    return {
        "lambda_max": float(lam[0]),
        "hessian_trace": float(trace),
        "hessian_trace_se": trace.std_error,
        "worst_sharpness": float(worst),
        "clean_train_loss": worst.loss,
        "landscape": {"alphas": line.coords[0].tolist(), "loss": line.loss.tolist()},
        "measures": {**m, "seconds": round(time.perf_counter() - t0, 1)},
    }


def sharpness_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The report's table of the measures beside test accuracy: mean ± sd over seeds per
    (dataset, noise, backend, optimizer form), grid runs that carry the measures."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        if in_grid(r) and all(r.get(k) is not None for k in MEASURE_KEYS):
            key = (r["dataset"], r["label_noise"], r["backend"], _label(r))
            groups.setdefault(key, []).append(r)
    if not groups:
        return []

    def cell(rs: list[dict[str, Any]], key: str, scale: float = 1.0, fmt: str = ".3g") -> str:
        mean, sd = _mean_std([scale * r[key] for r in rs])
        return f"{mean:{fmt}} ± {sd:{fmt}}"

    m = MEASURES
    subsets = "; ".join(f"{d}: its first {n} images" for d, n in sorted(MEASURE_EXAMPLES.items()))
    subsets = f" ({subsets}, `measures.examples` in each record)" if subsets else ""
    lines = [
        "## Sharpness of the final models",
        "",
        f"On the clean training set{subsets}, eval mode, plain cross-entropy: `lambda_max` "
        "(Lanczos, "
        f"{m['lanczos_iterations']} iterations), `hessian_trace` (Hutchinson, "
        f"{m['trace_probes']} Rademacher probes), `worst_sharpness` (worst-case adaptive "
        f"m-sharpness, rho {m['rho']}, m {m['m']}, {m['ascent_steps']} ascent steps; "
        "Andriushchenko et al., ICML 2023), from `sam_torch.diagnostics` / "
        "`sam_jax.diagnostics`; mean ± sd over seeds. Each run's record also holds a 1-D "
        "filter-normalized landscape (`landscape`).",
        "",
        "| dataset | noise | backend | optimizer | seeds | final test acc % | lambda_max "
        "| hessian_trace | worst_sharpness |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"SGD": 0}
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2] != "torch", order.get(k[3], 1), k[3])):
        rs = groups[key]
        lines.append(
            f"| {key[0]} | {round(100 * key[1])} % | {key[2]} | {key[3]} | {len(rs)} "
            f"| {cell(rs, 'final_test_acc', 100.0, '.1f')} | {cell(rs, 'lambda_max')} "
            f"| {cell(rs, 'hessian_trace')} | {cell(rs, 'worst_sharpness')} |"
        )
    lines.append("")
    return lines


def _save_figure(fig: Any, out: Path, name: str) -> str:
    """Lay out, write ``out/name`` (110 dpi) and close ``fig``; returns ``name``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plot_landscapes(runs: list[dict[str, Any]], out: Path) -> list[str]:
    """``landscape-<dataset>.png``: the 1-D landscapes of the final models (mean over seeds
    per backend and optimizer form, at the run's noise levels), drawn with
    :func:`sam_torch.diagnostics.plot_landscape`; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sam_core._diagnostics import Landscape
    from sam_core._plots import plot_landscape

    names = []
    for dataset in sorted({r["dataset"] for r in runs if r.get("landscape")}):
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            if r["dataset"] == dataset and r.get("landscape") and in_grid(r):
                label = f"{r['backend']} {_label(r)}, {round(100 * r['label_noise'])} % noise"
                groups.setdefault(label, []).append(r)
        curves = {}
        for label, rs in sorted(groups.items()):
            alphas = np.asarray(rs[0]["landscape"]["alphas"])
            loss = np.mean([r["landscape"]["loss"] for r in rs], axis=0)
            curves[f"{label} ({len(rs)} seeds)"] = Landscape((alphas,), loss, float(loss[len(loss) // 2]))
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_landscape(curves, ax, title=f"{dataset}: clean training loss along a filter-normalized direction")
        names.append(_save_figure(fig, out, f"landscape-{dataset}.png"))
    return names


# ---------------------------------------------------------------------------------------
# Results, summary, report
# ---------------------------------------------------------------------------------------


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": [], "invocations": []}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def update_results(
    path: Path, runs: list[dict[str, Any]], invocation: dict[str, Any]
) -> dict[str, Any]:
    """Merge ``runs`` and this invocation's record into ``results.json`` on disk, under an
    exclusive lock, so that invocations running at the same time (e.g. one per backend)
    all keep their runs. Returns the merged results."""
    import fcntl
    import hashlib
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    # The lock file lives in the temporary folder, not beside the results.
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"label-noise-{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            results = load_results(path)
            results["runs"] = merge_runs(results["runs"], runs)
            others = [i for i in results.get("invocations", []) if i.get("id") != invocation["id"]]
            results["invocations"] = [*others, dict(invocation)]
            save_results(path, results)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return results


def hardware() -> dict[str, Any]:
    """:func:`benchmarks._timing.machine_info` for the study's one thread per run: CPU model,
    logical CPUs, GPU if any, library versions (no paths, no host names)."""
    return machine_info(threads=1)


def _label(run: dict[str, Any]) -> str:
    label = OptimizerSpec(run["optimizer"], run["m_sharpness"]).display
    options = _options_text(run.get("form_options"))
    return f"{label} ({options})" if options else label


def wall_time_ratios(runs: list[dict[str, Any]]) -> None:
    """Set each run's ``wall_time_ratio``: its ``train_time_s`` over the median
    ``train_time_s`` of the SGD runs among ``runs`` (one invocation's) with the same dataset,
    backend, noise, epochs and training-set size, and ``cpu_time_ratio`` the same of
    ``train_cpu_s``; left as they are where there is no such SGD run.

    The median, not the mean: on a shared 2-core machine the same run has been measured 1.5x
    slower at one time than at another (its CPU time as well, so not for lack of a core), and
    one such SGD run among three would move every ratio of the invocation by a sixth."""

    def where(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["dataset"], r["backend"], r["label_noise"], r["epochs"], r.get("n_train"))

    for field, ratio in (("train_time_s", "wall_time_ratio"), ("train_cpu_s", "cpu_time_ratio")):
        sgd: dict[tuple[Any, ...], list[float]] = {}
        for r in runs:
            if r["optimizer"] == "sgd" and r.get(field):
                sgd.setdefault(where(r), []).append(r[field])
        for r in runs:
            base = sgd.get(where(r))
            if base and r.get(field):
                r[ratio] = round(r[field] / statistics.median(base), 3)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def in_grid(run: dict[str, Any]) -> bool:
    """Whether a run is one of the grid's: SGD, or the rho chosen for its optimizer form in
    :data:`DATASET_SETTINGS` (from any invocation, sweep runs included), when the run has the
    dataset's settings; otherwise (presets, ``--set``) whether it was planned as a grid run."""
    settings = DATASET_SETTINGS.get(run["dataset"])
    if settings is None or run.get("settings", {}).get("epochs", run["epochs"]) != settings[
        "config"
    ]["epochs"] or run.get("n_train") != settings["config"].get("limit_train"):
        return run.get("kind", "grid") == "grid"
    if run["optimizer"] in NO_RHO:
        return (run.get("form_options") or {}) == settings.get("form_options", {}).get(
            run["optimizer"], {}
        )
    label = OptimizerSpec(run["optimizer"], run["m_sharpness"]).label
    if (run.get("form_options") or {}) != settings.get("form_options", {}).get(label, {}):
        return False  # a knob sweep's run
    key = OptimizerSpec(run["optimizer"], run["m_sharpness"]).rho_key
    warmup = 0.0 if run["optimizer"] in NO_RHO_RAMP else float(
        settings["config"].get("rho_warmup_epochs", 0.0)
    )
    chosen = rho_for(settings, key, run["label_noise"])
    return (
        chosen is not None
        and abs(run["rho"] - chosen) < 1e-9
        and abs(rho_warmup_of(run) - warmup) < 1e-9
    )


def summarize(runs: list[dict[str, Any]], kind: str = "grid") -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds per (dataset, noise, backend,
    optimizer, m, rho, rho warm-up): of the grid's runs (:func:`in_grid`) with
    ``kind="grid"``, of every run otherwise."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        if kind == "grid" and not in_grid(r):
            continue
        k = (
            r["dataset"],
            r["label_noise"],
            r["epochs"],
            r["backend"],
            r["optimizer"],
            r["m_sharpness"],
            0.0 if r["optimizer"] in NO_RHO else r["rho"],
            rho_warmup_of(r),
            tuple(sorted((r.get("form_options") or {}).items())),
        )
        groups.setdefault(k, []).append(r)
    rows = []
    for k, rs in groups.items():
        row: dict[str, Any] = dict(
            zip(
                (
                    "dataset",
                    "label_noise",
                    "epochs",
                    "backend",
                    "optimizer",
                    "m_sharpness",
                    "rho",
                    "rho_warmup_epochs",
                    "form_options",
                ),
                k,
                strict=True,
            )
        )
        row["label"] = _label(rs[0])
        row["seeds"] = sorted(r["seed"] for r in rs)
        for metric in ("final_test_acc", "best_test_acc", "noisy_fit", "clean_fit",
                       "final_test_ece"):
            vals = [r.get(metric) for r in rs if r.get(metric) is not None]
            row[metric] = _mean_std(vals) if vals else None
        row["form_options"] = dict(row["form_options"])
        passes = [r["passes_per_step"] for r in rs if r.get("passes_per_step") is not None]
        row["passes_per_step"] = statistics.fmean(passes) if passes else None
        for key in ("wall_time_ratio", "cpu_time_ratio"):
            ratios = [r[key] for r in rs if r.get(key) is not None]
            row[key] = _mean_std(ratios) if ratios else None
        rows.append(row)
    order = {"sgd": 0, "sam": 1, "asam": 3}
    rows.sort(
        key=lambda r: (
            r["dataset"],
            r["label_noise"],
            r["backend"] != "torch",
            order.get(r["optimizer"], 4) + (1 if r["m_sharpness"] else 0),
            r["m_sharpness"] or 0,
            r["rho_warmup_epochs"],
            r["rho"],
        )
    )
    return rows


def _pct(ms: tuple[float, float] | None) -> str:
    return "–" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def _cost(r: dict[str, Any]) -> str:
    """``passes per step | wall time / SGD's`` cells (– for records without them), the CPU
    time's ratio beside the wall time's where the runs recorded it."""
    passes = "–" if r.get("passes_per_step") is None else f"{r['passes_per_step']:.2f}"
    ratio, cpu = r.get("wall_time_ratio"), r.get("cpu_time_ratio")
    text = "–" if ratio is None else f"{ratio[0]:.2f} ± {ratio[1]:.2f}"
    if ratio is not None and cpu is not None:
        text += f" (CPU {cpu[0]:.2f})"
    return f"{passes} | {text}"


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The study's targets on the grid means, one line each, with PASS or MISS."""
    lines = []
    by: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["dataset"], r["label_noise"], r["backend"]), {})[r["label"]] = r
    for (dataset, noise, backend), table in sorted(by.items()):
        sgd = table.get("SGD")
        sam = table.get("SAM")
        msams = [r for label, r in table.items() if label.startswith("m-SAM")]
        if sgd is None or (sam is None and not msams):
            continue
        sam = sam or msams[0]
        s, a = 100 * sgd["final_test_acc"][0], 100 * sam["final_test_acc"][0]
        seeds = min(len(r["seeds"]) for r in (sgd, sam, *msams))
        head = f"{dataset}, {round(100 * noise)} % noise, {backend} ({seeds} seeds)"
        if dataset == "digits":
            ok = a >= s + 5
            lines.append(f"- {head}: SAM {a:.1f} >= SGD {s:.1f} + 5: {'PASS' if ok else 'MISS'}")
            for m in msams:
                b = 100 * m["final_test_acc"][0]
                ok = b >= a
                lines.append(f"- {head}: {m['label']} {b:.1f} >= SAM {a:.1f}: "
                             f"{'PASS' if ok else 'MISS'}")
        else:
            best = max([sam, *msams], key=lambda r: r["final_test_acc"][0])
            b = 100 * best["final_test_acc"][0]
            ok = b >= s + 5
            seeds = min(len(sgd["seeds"]), len(best["seeds"]))
            head = f"{dataset}, {round(100 * noise)} % noise, {backend} ({seeds} seeds)"
            lines.append(f"- {head}: best of SAM/m-SAM ({best['label']}) {b:.1f} >= SGD "
                         f"{s:.1f} + 5: {'PASS' if ok else 'MISS'}")
            nf = sgd["noisy_fit"]
            if nf is not None:
                lines.append(f"- {head}: SGD memorizes the noise (final noisy_fit "
                             f"{100 * nf[0]:.1f} %): {'PASS' if nf[0] >= 0.9 else 'MISS'}")
    # The backends agree within their seed spread: |mean_torch - mean_jax| <= sd_torch + sd_jax.
    pairs: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault(
            (r["dataset"], r["label_noise"], r["label"], r["rho"], r["rho_warmup_epochs"]), {}
        )[r["backend"]] = r
    for (dataset, noise, label, _, _), both in sorted(pairs.items()):
        if {"torch", "jax"} <= set(both):
            (mt, st), (mj, sj) = both["torch"]["final_test_acc"], both["jax"]["final_test_acc"]
            ok = abs(mt - mj) <= st + sj
            lines.append(
                f"- {dataset}, {round(100 * noise)} % noise, {label}: torch {100 * mt:.1f} ± "
                f"{100 * st:.1f} vs jax {100 * mj:.1f} ± {100 * sj:.1f} agree within the seed "
                f"spread (|difference| <= sum of the two sds): {'PASS' if ok else 'MISS'}"
            )
    return lines


# ---------------------------------------------------------------------------------------
# Cost against accuracy (issue 26): the Pareto plot, the budget table, the cheap-form target
# ---------------------------------------------------------------------------------------

#: The budgets of "which SAM for my budget": training time as a multiple of SGD's.
BUDGETS = (1.1, 1.3, 1.6, 2.2)
#: The cheap-form target: at <= 1.3x SGD's training time, >= 80 % of SAM's gain over SGD.
CHEAP_RATIO, CHEAP_SHARE = 1.3, 0.8


def _frontier_groups(
    rows: list[dict[str, Any]],
) -> dict[tuple[Any, ...], tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]]:
    """Per (dataset, noise, backend): SGD's grid row, plain SAM's grid row and every grid row
    with a measured ``wall_time_ratio`` (SGD included)."""
    out: dict[tuple[Any, ...], Any] = {}
    for r in rows:
        k = (r["dataset"], r["label_noise"], r["backend"])
        sgd, sam, timed = out.get(k, (None, None, []))
        if r["optimizer"] == "sgd":
            sgd = r
        elif r["optimizer"] == "sam" and not r["m_sharpness"]:
            sam = r
        if r.get("wall_time_ratio") is not None and r.get("final_test_acc") is not None:
            timed = [*timed, r]
        out[k] = (sgd, sam, timed)
    return out


def gain_share(row: dict[str, Any], sgd: dict[str, Any], sam: dict[str, Any]) -> float | None:
    """The share of SAM's gain over SGD that ``row`` keeps: ``(acc - acc_SGD) / (acc_SAM -
    acc_SGD)`` on the mean final test accuracies; ``None`` when SAM gains nothing."""
    base, full = sgd["final_test_acc"][0], sam["final_test_acc"][0]
    if full <= base:
        return None
    return (row["final_test_acc"][0] - base) / (full - base)


def budget_lines(rows: list[dict[str, Any]]) -> list[str]:
    """"Which SAM for my budget": per dataset, noise and backend, the form with the best mean
    final test accuracy among those whose mean training time is within each budget of
    :data:`BUDGETS` (and without a budget), with its share of SAM's gain."""
    lines: list[str] = []
    for (dataset, noise, backend), (sgd, sam, timed) in sorted(_frontier_groups(rows).items()):
        if sgd is None or sam is None or len(timed) < 2:
            continue
        if not lines:
            lines += [
                "| dataset | noise | backend | time budget (x SGD) | best form within it "
                "| final test acc | share of SAM's gain | passes/step | time / SGD |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
        for budget in (*BUDGETS, None):
            fits = [r for r in timed if budget is None or r["wall_time_ratio"][0] <= budget]
            if not fits:
                continue
            best = max(fits, key=lambda r: r["final_test_acc"][0])
            share = gain_share(best, sgd, sam)
            lines.append(
                f"| {dataset} | {round(100 * noise)} % | {backend} "
                f"| {'any' if budget is None else f'<= {budget:g}'} | {best['label']} "
                f"| {_pct(best['final_test_acc'])} "
                f"| {'–' if share is None else f'{100 * share:.0f} %'} | {_cost(best)} |"
            )
    return lines


def cheap_form_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The target of issue 26 per dataset, noise and backend: some form at <= 1.3x SGD's
    training time keeps >= 80 % of SAM's gain over SGD (mean final test accuracies)."""
    lines = []
    for (dataset, noise, backend), (sgd, sam, timed) in sorted(_frontier_groups(rows).items()):
        if sgd is None or sam is None:
            continue
        cheap = [r for r in timed if r["optimizer"] != "sgd"
                 and r["wall_time_ratio"][0] <= CHEAP_RATIO]
        head = f"- {dataset}, {round(100 * noise)} % noise, {backend}"
        if not cheap:
            lines.append(f"{head}: no form measured at <= {CHEAP_RATIO:g}x SGD's time: MISS")
            continue
        best = max(cheap, key=lambda r: gain_share(r, sgd, sam) or -1.0)
        share = gain_share(best, sgd, sam)
        ok = share is not None and share >= CHEAP_SHARE
        lines.append(
            f"{head}: {best['label']} at {best['wall_time_ratio'][0]:.2f}x SGD's time keeps "
            + ("–" if share is None else f"{100 * share:.0f} %")
            + f" of SAM's gain (>= {100 * CHEAP_SHARE:.0f} % at <= {CHEAP_RATIO:g}x): "
            + ("PASS" if ok else "MISS")
        )
    return lines


def plot_pareto(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """``pareto-<dataset>.png``: final test accuracy against training time relative to SGD,
    a point per form with its seed spread (mean ± sd on both axes), a panel per backend, at
    the dataset's default noise level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = _frontier_groups(rows)
    for dataset in sorted({k[0] for k in groups}):
        default = DATASET_SETTINGS.get(dataset, {}).get("config", {}).get("label_noise")
        panels = [(k, v) for k, v in sorted(groups.items())
                  if k[0] == dataset and k[1] == default and len(v[2]) >= 2]
        if not panels:
            continue
        labels = sorted({r["label"] for _, (_, _, timed) in panels for r in timed})
        color = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # the same per form
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
        for ax, ((_, noise, backend), (_, _, timed)) in zip(axes[0], panels, strict=True):
            for r in sorted(timed, key=lambda r: r["wall_time_ratio"][0]):
                (x, dx), (y, dy) = r["wall_time_ratio"], r["final_test_acc"]
                ax.errorbar(x, 100 * y, xerr=dx, yerr=100 * dy, fmt="o", color=color[r["label"]],
                            capsize=3, label=f"{r['label']} ({len(r['seeds'])} seeds)")
            ax.axvline(CHEAP_RATIO, color="0.6", linestyle=":", linewidth=1)
            ax.set_title(f"{dataset}, {round(100 * noise)} % label noise, {backend}")
            ax.set_xlabel("training time / SGD's (same invocation)")
            ax.set_ylabel("final test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        written.append(_save_figure(fig, out, f"pareto-{dataset}.png"))
    return written


def plot_curves(runs: list[dict[str, Any]], out: Path) -> list[str]:
    """``curves-<dataset>.png`` per dataset: test accuracy and noisy_fit per epoch, mean over
    seeds per backend and optimizer (grid runs at the dataset's default noise level, else
    the lowest nonzero one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset in sorted({r["dataset"] for r in runs}):
        grid = [r for r in runs if r["dataset"] == dataset and in_grid(r)]
        if not grid:
            continue
        levels = {r["label_noise"] for r in grid}
        default = DATASET_SETTINGS.get(dataset, {}).get("config", {}).get("label_noise")
        if default in levels:
            noise = default
        else:
            noise = min((n for n in levels if n > 0), default=0.0)
        grid = [r for r in grid if r["label_noise"] == noise]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in grid:
            groups.setdefault((r["backend"], _label(r)), []).append(r)
        labels = sorted({k[1] for k in groups})
        colors = {label: f"C{i}" for i, label in enumerate(labels)}
        for (backend, label), rs in sorted(groups.items()):
            epochs = min(len(r["history"]) for r in rs)
            x = list(range(1, epochs + 1))
            for ax, metric in zip(axes, ("test_acc", "noisy_fit"), strict=True):
                ys = [
                    statistics.fmean(100 * (r["history"][e][metric] or 0.0) for r in rs)
                    for e in range(epochs)
                ]
                ax.plot(
                    x,
                    ys,
                    color=colors[label],
                    linestyle="-" if backend == "torch" else "--",
                    label=f"{label}, {backend} ({len(rs)} seed{'s' if len(rs) > 1 else ''})",
                )
        axes[0].set_title(f"{dataset}, {round(100 * noise)} % label noise: test accuracy")
        axes[0].set_ylabel("test accuracy (%)")
        axes[1].set_title("noisy_fit: flipped training labels fitted")
        axes[1].set_ylabel("noisy_fit (%)")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        written.append(_save_figure(fig, out, f"curves-{dataset}.png"))
    return written


def _settings_line(runs: list[dict[str, Any]], dataset: str) -> str:
    s = next(r["settings"] for r in runs if r["dataset"] == dataset)
    keys = ("depth", "width", "limit_train", "limit_test", "no_augment", "epochs", "batch_size",
            "lr", "schedule", "momentum", "weight_decay", "label_smoothing")
    if dataset == "digits":
        keys = tuple(k for k in keys if k not in ("depth", "width", "limit_train",
                                                  "limit_test", "no_augment"))
    return ", ".join(f"{k}={s[k]}" for k in keys if k in s)


def _rho_text(r: dict[str, Any]) -> str:
    """rho, and its warm-up when there is one (``0.15, warm-up 5 ep``)."""
    if r["optimizer"] in NO_RHO:
        return "–"
    warm = rho_warmup_of(r)
    return f"{r['rho']:g}" + (f", warm-up {warm:g} ep" if warm else "")


def write_report(results: dict[str, Any], out: Path) -> str:
    """Write ``report.md`` and the curves from ``results``; return the report's text."""
    runs = results["runs"]
    rows = summarize(runs, "grid")
    images = plot_curves(runs, out) if runs else []
    lines = ["# Label-noise study", ""]
    lines += [
        "Symmetric label noise on the training set (test labels clean), the same labels, data, "
        "epochs and learning-rate schedule for every optimizer; mean ± sample standard "
        "deviation over seeds, in percent. `noisy_fit`: fraction of flipped training examples "
        "predicted as their noisy label (memorization), `clean_fit`: fraction of the other "
        "training examples predicted correctly; both in eval mode after the last epoch. "
        "Written by `python -m benchmarks.label_noise` (see the commands below); each run "
        "is one call of `examples.train_torch.train` or `examples.train_jax.train` with one "
        "thread (JAX m-SAM with `m_sharpness_impl='vectorized'`, the faster form here; same "
        "numbers as the scan form). `rho 0.2, warm-up 5 ep`: rho ramped linearly from 0 over "
        "the first 5 epochs (`--rho-warmup-epochs`, `sam_torch.RhoWarmup` / "
        "`sam_jax.rho_warmup_schedule`); without it, rho from the first step. "
        "`passes/step`: forward-backward passes over a batch per optimizer step, as the "
        "training loop counts them; `time / SGD`: the run's training time (its epochs, "
        "without the worker's start-up) over the median of SGD's runs of the same invocation "
        "(the mean in invocations recorded before the median was used), "
        "whose runs share the machine with each other (`--jobs` at a time) and with "
        "whatever else runs there (–: a run recorded before these fields, or without SGD "
        "in its invocation); `(CPU x)`: the same ratio of the CPU time the runs spent "
        "training (one thread each, so a load that comes and goes on the machine moves "
        "it far less than the wall time; runs recorded before it have none). A form's own knobs (`--set k=...,alpha=...`) are in brackets "
        "where they are not its defaults. "
        "`final ECE`: "
        "expected calibration error (15 bins) of the final model's test probabilities "
        "(BSAM: its predictive, the softmax averaged over 8 posterior samples, whose accuracy "
        "is `final_test_acc_calibrated` in `results.json`; BSAM's `final test acc` is its "
        "posterior mean's); – where a run predates the measure.",
        "",
    ]
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [f"## {dataset}", "", f"Settings: {_settings_line(runs, dataset)}.", ""]
        lines += [
            "| noise | backend | optimizer | rho | seeds | final test acc | best test acc "
            "| noisy_fit | clean_fit | final ECE | passes/step | time / SGD |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["dataset"] == dataset):
            rho = _rho_text(r)
            lines.append(
                f"| {round(100 * r['label_noise'])} % | {r['backend']} | {r['label']} | {rho} "
                f"| {len(r['seeds'])} "
                f"| {_pct(r['final_test_acc'])} | {_pct(r['best_test_acc'])} "
                f"| {_pct(r['noisy_fit'])} | {_pct(r['clean_fit'])} "
                f"| {_pct(r['final_test_ece'])} | {_cost(r)} |"
            )
        if f"curves-{dataset}.png" in images:
            lines += ["", f"![learning curves](curves-{dataset}.png)"]
        lines.append("")
    lines += sharpness_lines(runs)  # issue 27
    lines += [f"![loss landscapes]({name})" for name in plot_landscapes(runs, out)] + [""]
    budget = budget_lines(rows)
    if budget:
        lines += [
            "## Which SAM for my budget",
            "",
            "Per budget of training time (a multiple of SGD's, measured in the same "
            "invocation), the grid form with the best mean final test accuracy among those "
            "whose mean time is within it, and its share of SAM's gain over SGD, "
            "`(acc - acc_SGD) / (acc_SAM - acc_SGD)`. Only runs that carry a measured time "
            "ratio count. The Pareto plot shows every form with its seed spread.",
            "",
            *budget,
            "",
            *[f"![accuracy against cost]({name})" for name in plot_pareto(rows, out)],
            "",
        ]
    targets = check_targets(rows) + cheap_form_targets(rows)
    if targets:
        lines += ["## Targets", "", *targets, ""]
    every = [r for r in summarize(runs, "all") if r["optimizer"] != "sgd"]
    rhos: dict[tuple[Any, ...], set[Any]] = {}

    def form(r: dict[str, Any]) -> tuple[Any, ...]:  # the form, whatever its knobs
        return (r["dataset"], r["label_noise"], r["backend"], r["optimizer"], r["m_sharpness"])

    for r in every:
        rhos.setdefault(form(r), set()).add(
            (r["rho"], r["rho_warmup_epochs"], _options_text(r["form_options"]))
        )
    sweep = [r for r in every if len(rhos[form(r)]) > 1]
    if sweep:
        lines += [
            "## rho sweep",
            "",
            "Every rho run of an optimizer form (grid and sweep runs; a form's own knobs, "
            "`--k` / `--alpha`, in brackets where they are not its defaults); the grid above "
            "uses, per dataset, noise level and form, the rho of `DATASET_SETTINGS` in "
            "`benchmarks/label_noise.py`, chosen as the best mean final test accuracy of this "
            "sweep.",
            "",
            "| dataset | noise | backend | optimizer | rho | seeds | final test acc "
            "| best test acc | noisy_fit | passes/step | time / SGD |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sweep:
            lines.append(
                f"| {r['dataset']} | {round(100 * r['label_noise'])} % | {r['backend']} "
                f"| {r['label']} | {_rho_text(r)} "
                f"| {len(r['seeds'])} | {_pct(r['final_test_acc'])} "
                f"| {_pct(r['best_test_acc'])} | {_pct(r['noisy_fit'])} | {_cost(r)} |"
            )
        lines.append("")
    lines += ["## Commands and hardware", ""]
    for inv in results.get("invocations", []):
        hw = inv["hardware"]
        lines.append(
            f"- `{inv['command']}` ({inv['started']}; {inv['runs_done']} runs, "
            f"{inv['wall_min']:.1f} min wall, {inv['jobs']} at a time, 1 thread each) on "
            f"{hw['cpu']}, {hw['logical_cpus']} logical CPUs"
            + (f", {hw['gpu']}" if hw.get("gpu") else "")
            + f"; torch {hw['torch']}, jax {hw['jax']}, flax {hw['flax']}"
        )
    lines.append("")
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="SAM vs SGD under label noise, both backends, several seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=sorted(DATASET_SETTINGS), default="digits")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a full-scale configuration for a GPU (replaces the dataset settings)")
    p.add_argument("--optimizers", default=None,
                   help="registry names, '/mM' for m-sharpness (e.g. sam/m16) (default: "
                   f"{','.join(DEFAULT_OPTIMIZERS)}; with --missing-measures: every form)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--backends", default="torch,jax")
    p.add_argument("--label-noise", default=None, help="comma-separated fractions (default: "
                   "the dataset's 0.4, or the preset's levels)")
    p.add_argument("--sweep-rho", action="store_true",
                   help="run the dataset's rho sweep (its forms among --optimizers) instead of "
                   "the grid")
    p.add_argument("--rho", default=None, help="rho overrides, e.g. sam=0.1,sam/m=0.05")
    p.add_argument("--set", default=None, metavar="KEY=VALUE,...",
                   help="override training settings (e.g. epochs=20,limit_train=1024)")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--replace", action="store_true",
                   help="rerun runs already in results.json and replace them (default: skip)")
    p.add_argument("--missing-measures", action="store_true",
                   help="rerun the recorded runs (of --dataset, --backends, and --label-noise "
                   "and --optimizers where given) whose records lack the sharpness measures, "
                   "each at its own recorded settings, and replace them")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default=str(OUT))
    return p


def parse_settings(text: str | None) -> dict[str, Any]:
    """``--set``'s ``KEY=VALUE,...`` as a dict: ints, floats and true/false parsed, other
    values kept as strings."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        parsed: Any = value
        for cast in (int, float):
            try:
                parsed = cast(value)
                break
            except ValueError:
                continue
        if value in ("true", "false", "True", "False"):
            parsed = value.lower() == "true"
        out[key.strip()] = parsed
    return out


def _command(argv: list[str]) -> str:
    """The command line as recorded: without the values of --data-dir and --out (local
    paths)."""
    tokens, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token in ("--data-dir", "--out"):
            skip = True
            continue
        if token.startswith(("--data-dir=", "--out=")):
            continue
        tokens.append(token)
    return " ".join(["python -m benchmarks.label_noise", *tokens])


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    path = out / "results.json"
    results = load_results(path)
    if args.report_only:
        write_report(results, out)
        return results
    settings = dict(settings_for(args.dataset, args.preset))
    if args.rho:
        settings["rho_override"] = {
            k: float(v) for k, _, v in (i.partition("=") for i in args.rho.split(","))}
    overrides = parse_settings(args.set)
    if settings["config"]["dataset"] != "digits":
        overrides["data_dir"] = args.data_dir
    names = args.optimizers if args.optimizers is not None else ",".join(DEFAULT_OPTIMIZERS)
    optimizers = [parse_optimizer(o) for o in names.split(",") if o.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("torch", "jax"):
            raise SystemExit(f"--backends must name torch and/or jax, got {b!r}")
    noise = _floats(args.label_noise) if args.label_noise else None
    if args.missing_measures:
        plan = missing_measures_plan(
            results["runs"], datasets=[settings["config"]["dataset"]], backends=backends,
            noise_levels=noise, data_dir=args.data_dir,
            optimizers=None if args.optimizers is None else [o.label for o in optimizers])
    else:
        plan = plan_runs(settings, optimizers, _ints(args.seeds), backends,
                         overrides=overrides, sweep=args.sweep_rho, noise_levels=noise)
    done = {run_key(r) for r in results["runs"]}
    # Seed by seed (every form's seed 0, then seed 1, ...): SGD's runs, the baseline of every
    # wall_time_ratio, then spread over the invocation and share the machine's state (other
    # load, its clock) with the runs they are the baseline of, instead of all running first.
    replace = args.replace or args.missing_measures  # reruns replace their records
    todo = [s for s in plan if replace or s.key() not in done]
    if args.missing_measures:  # that plan has its own order: the grid's runs first
        log(f"{len(todo)} runs in {path.name} lack the sharpness measures: rerunning them "
            f"(their records replaced), {args.jobs} at a time")
    else:
        todo.sort(key=lambda s: s.seed)
        log(f"{len(plan)} runs planned, {len(plan) - len(todo)} already in {path.name}, "
            f"{len(todo)} to run, {args.jobs} at a time")
    invocation = {
        "id": f"{time.time():.6f}-{os.getpid()}",
        "command": _command(argv if argv is not None else sys.argv[1:]),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware(),
        "jobs": args.jobs,
        "runs_done": 0,
        "wall_min": 0.0,
    }
    started = time.perf_counter()
    recorded: list[dict[str, Any]] = []

    def record(run: dict[str, Any]) -> None:
        nonlocal results
        recorded.append(run)
        invocation["runs_done"] += 1
        invocation["wall_min"] = round((time.perf_counter() - started) / 60, 2)
        # the ratios so far, against this invocation's SGD runs so far: an interrupted
        # invocation keeps the ratios of what it ran
        wall_time_ratios(recorded)
        results = update_results(path, recorded, invocation)
        log(f"[{invocation['runs_done']}/{len(todo)}] {run['dataset']} {run['backend']} "
            f"{_label(run)} rho {_rho_text(run)} seed {run['seed']}: final "
            f"{100 * run['final_test_acc']:.1f} best {100 * run['best_test_acc']:.1f} "
            f"noisy_fit {100 * (run['noisy_fit'] or 0):.1f} ({run['wall_s']:.0f} s)")

    failures = []
    if args.jobs <= 1:
        _single_thread_env()  # before the first run imports torch/JAX (a no-op once they run)
        for spec in todo:
            record(execute(spec))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"),
                                 initializer=_single_thread_env) as pool:
            futures = {pool.submit(execute, spec): spec for spec in todo}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    if f.exception() is not None:  # keep the other runs going
                        spec = futures[f]
                        failures.append(f"{spec.backend} {spec.optimizer.label} seed "
                                        f"{spec.seed}: {f.exception()!r}")
                        log(f"FAILED {failures[-1]}")
                    else:
                        record(f.result())
    if todo:
        wall_time_ratios(recorded)  # against this invocation's SGD runs
        results = update_results(path, recorded, invocation)
    write_report(results, out)
    if failures:
        raise SystemExit(f"{len(failures)} runs failed: " + "; ".join(failures))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
