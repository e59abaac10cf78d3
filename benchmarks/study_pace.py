"""The label-noise study's training time per form, as a ratio to SGD's, measured paired.

    python -m benchmarks.study_pace --dataset cifar10 --data-dir DATA --epochs 3 --rounds 3

The study (:mod:`benchmarks.label_noise`) times each run as a whole, two runs at a time on
a shared machine, so a run's time depends on what ran beside it: on the CIFAR-10 subset the
same one-pass work (SGD, SAF, Momentum-SAM) measured 0.8-1.25x apart. Here every form trains
the study's grid configuration (its rho and knobs, :func:`benchmarks.label_noise.plan_runs`)
for ``--epochs`` epochs, in this one process with one thread, the forms round-robin and the
order rotated each round; a form's time is the median of its epochs over all rounds (the
epochs' time: training steps and the study's per-epoch evaluation, as the study counts), and
its ratio is to SGD's median. The output is a markdown table (``--out``: also written to a
file).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from benchmarks import label_noise as study
from benchmarks._timing import limit_threads_env, machine_info
from examples.cli import TRAJECTORY_FORMS


def measure(dataset: str, optimizers: list[str], *, epochs: int, rounds: int,
            data_dir: str | None = None, skip_epochs: int = 0,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per form: the epochs' times over ``rounds`` interleaved runs of ``epochs`` epochs
    (each run's first ``skip_epochs`` left out), their median, passes per step and the ratio
    of the median to SGD's; ``overrides``: training settings over the grid's (``--set``)."""
    from examples import train_torch
    from examples.cli import make_config

    specs = [study.parse_optimizer(o) for o in optimizers]
    if specs[0].name != "sgd":
        raise ValueError(f"the first optimizer is the baseline and must be sgd, got {optimizers[0]!r}")
    if not 0 <= skip_epochs < epochs:
        raise ValueError(f"skip_epochs must be in [0, epochs = {epochs}), got {skip_epochs}")
    settings = {**(overrides or {}), "epochs": epochs}
    if data_dir is not None:
        settings["data_dir"] = data_dir
    plan = study.plan_runs(study.settings_for(dataset, None), specs, [0], ["torch"],
                           overrides=settings)
    times: dict[str, list[float]] = {s.optimizer.label: [] for s in plan}
    passes: dict[str, float] = {}
    terms: dict[str, int] = dict.fromkeys(times, 0)
    for r in range(rounds):
        for spec in plan[r % len(plan):] + plan[: r % len(plan)]:
            values = spec.overrides()
            values["threads"] = 1
            history, _ = train_torch.train_model(make_config(**values))
            label = spec.optimizer.label
            timed = history[skip_epochs:]
            times[label] += [h["epoch_time_s"] for h in timed]
            # timed epochs in which a trajectory form's term was on (SAF / MESA)
            terms[label] += sum(1 for h in timed if (h.get("trajectory_loss") or 0.0) > 0.0)
            passes[label] = study.pass_rates(timed)["passes_per_step"]
    base = statistics.median(times[plan[0].optimizer.label])
    rows = {
        label: {"median_epoch_s": statistics.median(t), "epochs": len(t),
                "passes_per_step": passes[label], "term_epochs": terms[label],
                "ratio_to_sgd": round(statistics.median(t) / base, 3)}
        for label, t in times.items()
    }
    return {"dataset": dataset, "epochs": epochs, "rounds": rounds, "rows": rows,
            "skip_epochs": skip_epochs, "overrides": dict(overrides or {}),
            "machine": machine_info(threads=1)}


def report(result: dict[str, Any], command: str) -> str:
    m = result["machine"]
    lines = [
        f"# The study's training time per form, paired ({result['dataset']})",
        "",
        f"`{command}`: each form's grid configuration"
        + (f" with {_settings(result['overrides'])}" if result.get("overrides") else "")
        + f" for {result['epochs']} epochs, {result['rounds']} rounds round-robin in one "
        "process, one thread; the median epoch (training steps and the per-epoch evaluation"
        + (f"; each run's first {result['skip_epochs']} epoch(s) not timed"
           if result.get("skip_epochs") else "")
        + ") over SGD's. "
        f"{m.get('cpu', 'CPU')}, {m.get('logical_cpus', '?')} logical CPUs, torch "
        f"{m.get('torch', '?')}.",
        "",
        "| form | passes / step | median epoch (s) | epochs timed | time / SGD |",
        "|---|---|---|---|---|",
    ]
    terms = []
    for label, r in result["rows"].items():
        spec = study.parse_optimizer(label)
        lines.append(f"| {spec.display} | {r['passes_per_step']:.2f} | {r['median_epoch_s']:.2f} "
                     f"| {r['epochs']} | {r['ratio_to_sgd']:.2f} |")
        if spec.name in TRAJECTORY_FORMS:
            terms.append(f"{spec.display} {r['term_epochs']} of {r['epochs']}")
    if terms:
        lines += ["", "Timed epochs with the trajectory term on: " + ", ".join(terms) + "."]
    return "\n".join(lines) + "\n"


def _settings(overrides: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in sorted(overrides.items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(study.DATASET_SETTINGS), default="cifar10")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/")
    p.add_argument("--optimizers", default="sgd,looksam,sam",
                   help="registry names, SGD first (the baseline)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-epochs", type=int, default=0,
                   help="leave each run's first N epochs out of the times (e.g. those before a "
                        "trajectory form's term starts)")
    p.add_argument("--set", default=None, metavar="KEY=VALUE,...",
                   help="override training settings, as the study's --set (e.g. "
                        "saf_start_epoch=0,saf_lag_epochs=1,mesa_start_epoch=0)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.rounds < 1:
        raise SystemExit(f"--epochs and --rounds must be >= 1, got {args.epochs} and {args.rounds}")
    limit_threads_env(1)
    result = measure(args.dataset, [o.strip() for o in args.optimizers.split(",") if o.strip()],
                     epochs=args.epochs, rounds=args.rounds, data_dir=args.data_dir,
                     skip_epochs=args.skip_epochs, overrides=study.parse_settings(args.set))
    shown = ["python -m benchmarks.study_pace", "--dataset", args.dataset,
             *(["--data-dir", "DATA"] if args.data_dir else []), "--optimizers", args.optimizers,
             "--epochs", str(args.epochs), "--rounds", str(args.rounds),
             *(["--skip-epochs", str(args.skip_epochs)] if args.skip_epochs else []),
             *(["--set", args.set] if args.set else [])]
    text = report(result, " ".join(shown))
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
