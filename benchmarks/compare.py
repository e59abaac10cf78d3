#!/usr/bin/env python
"""sam-opt measured against its peers, on the machine it runs on (the main job).

    python benchmarks/compare.py                 # the quick run: every section, 300 s budget
    python benchmarks/compare.py --full          # the full run: the figures to quote
    python benchmarks/compare.py --smoke         # tiny sizes, seconds (what the tests run)
    python benchmarks/compare.py --data-dir ~/data --budget default
    python benchmarks/compare.py --sections overhead --repeats 100 --threads 1
    python benchmarks/compare.py --gpu           # the GPU job: one CUDA device, then its tests
    python -m benchmarks ...                     # the same

Each run writes a new folder ``runs/compare-YYYYmmdd-HHMMSS/`` in the clone (ignored by git)
and prints its path at the end: ``report.md``, ``results.json`` (every figure and the
machine: CPU model, cores, GPU, library versions) and PNG plots. ``--out DIR`` writes into
``DIR`` instead (``--out benchmarks/results`` updates the committed results).

Sections (``benchmarks/<name>.py``, each ``run(config, progress) -> dict``; see
``benchmarks/README.md`` for what each figure means):

1. ``overhead``: SAM's ``first_step`` + ``second_step`` against a base SGD step on the
   WRN-16-8 parameter set: sam_torch, ``pytorch_optimizer.SAM`` and a loop-per-tensor
   baseline of the popular wrapper; SAM and ASAM.
2. ``step``: the whole training step on a WRN, torch and JAX, SAM vs SGD.
3. ``memory``: extra parameter-sized buffers each SAM keeps beyond its base optimizer.
4. ``agreement``: sam_torch vs sam_jax after a few steps, float32 and float64.
5. ``accuracy``: with CIFAR-10, SGD vs SAM vs ASAM, both backends, and a 1-D
   loss-landscape plot through the SGD and SAM solutions; without it, SGD vs SAM vs m-SAM on
   the bundled digits with 40 % label noise. Both train through the examples' functions.
6. ``variants``: cost of one training step of each SAM-family variant, as a ratio to SGD.
7. ``msharpness``: an m-SAM step (``m_sharpness_step``, ``m_sharpness_update``) against a
   batch-SAM step, every execution path of both backends.
8. ``diagnostics``: a Hessian-vector product against a gradient and lambda_max by Lanczos in
   both backends, against PyHessian's power iteration (``sam_torch/jax.diagnostics``).
9. ``gpu``: SAM under bfloat16 / float16 autocast (``ScaledSAM``) against SGD at the same
   precision, peak device memory, host syncs per SAM step on CUDA. Part of ``--gpu``; a CPU
   run includes it only with ``--sections gpu``.

``--gpu`` is the GPU job: the full run on ``cuda`` at the sections' GPU sizes (WRN-16-8,
batch 128), every section but the accuracy one, then the CUDA tests
(``pytest -m cuda``), into one folder ``runs/gpu-YYYYmmdd-HHMMSS/`` whose ``report.md`` names
the GPU, its driver and the CUDA, cuDNN and library versions. Without a CUDA device it exits
at once with a message that says so.

A missing peer (``pytorch_optimizer``, ``jax``/``optax``/``flax``) is reported as missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_STARTED = time.perf_counter()  # the script's run time counts from here, imports included
_ROOT = Path(__file__).resolve().parent.parent
_HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # run as a script: import `benchmarks` and `examples` from the clone
    if sys.path and Path(sys.path[0]).resolve() == _HERE:
        sys.path.pop(0)  # not the sections as top-level modules (`step`, `report`, ...)
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))


# --------------------------------------------------------------------------------------
# the sections
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Section:
    """One section of the main job: ``module`` has ``run(config, progress) -> dict`` (and
    optionally ``TITLE``, ``ESTIMATE_S`` per mode, ``report(result)``, ``targets(result)``).
    An ``optional`` section whose module is absent is skipped with a note."""

    name: str
    module: str
    optional: bool = False
    #: run when ``--sections`` is not given (``False``: only when named, or by ``--gpu``)
    default: bool = True


#: The sections, in the order they run (the report orders them by their titles' numbers).
SECTIONS: tuple[Section, ...] = (
    Section("overhead", "benchmarks.overhead"),
    Section("memory", "benchmarks.memory"),
    Section("step", "benchmarks.step"),
    Section("variants", "benchmarks.variants"),
    Section("msharpness", "benchmarks.msharpness"),
    Section("diagnostics", "benchmarks.diagnostics"),
    Section("accuracy", "benchmarks.accuracy"),
    Section("gpu", "benchmarks.gpu", default=False),
    Section("agreement", "benchmarks.agreement"),  # last: it switches JAX to float64 a while
)
SECTION_NAMES = tuple(s.name for s in SECTIONS)
#: Sections ``--gpu`` leaves out: the accuracy one is a training run, not a GPU figure.
NOT_IN_GPU_JOB = ("accuracy",)
#: The GPU job's tests: those marked ``cuda`` (``tests/torch/test_cuda.py``).
GPU_TESTS = ("-m", "cuda", "tests")
GPU_TESTS_TIMEOUT_S = 300
MODES = ("smoke", "quick", "full")

#: The quick run's time budget in seconds, per default section, on 2 CPU cores and on its
#: first run after set-up (no compilation cache yet). The sizes and repeats of each section's
#: quick run were chosen to land under it; inside a section the timed rounds stop once its
#: budget is spent (after at least :data:`MIN_ROUNDS`), so a slower machine still finishes
#: near it. ``STARTUP`` is what lies outside the sections: start-up, imports, the plots and
#: the report (15 s measured on a first run: imports and the first compiles outside sections).
#: ``overhead`` includes torch.compile's first build of the compiled ASAM perturbation when
#: inductor's own cache (outside the clone) is empty: 34-35 s on a fresh 2-core Intel Xeon,
#: 14 s with that cache. The knob if a machine comes out over: the sections' ``SIZES["quick"]``.
BUDGET_S: dict[str, float] = {
    "STARTUP": 15,
    "overhead": 45,
    "memory": 5,
    "step": 40,
    "variants": 55,
    "msharpness": 40,
    "diagnostics": 12,
    "accuracy": 50,
    "agreement": 25,
}
#: What the quick run must take in all, first run included (the budget above adds up to less).
QUICK_LIMIT_S = 300
#: The fewest timed rounds a section's time box leaves (a median of fewer means little).
MIN_ROUNDS = 3
#: Where compiled XLA executables are kept between runs (JAX's persistent compilation cache),
#: relative to the clone; ``runs/`` is ignored by git. ``SAM_BENCH_CACHE_DIR`` moves it,
#: ``SAM_BENCH_CACHE=0`` or ``--no-cache`` turns it off.
CACHE_DIR = Path("runs") / ".cache" / "jax"


def load_section(section: Section) -> tuple[Any, str | None]:
    """``(module, None)``, or ``(None, note)`` for an optional section that is absent."""
    if section.optional and importlib.util.find_spec(section.module) is None:
        path = section.module.replace(".", "/") + ".py"
        return None, f"{path} is not in this checkout"
    return importlib.import_module(section.module), None


def _title(name: str, module: Any) -> str:
    return getattr(module, "TITLE", None) or name


def _order_key(title: str) -> tuple[float, str]:
    head = title.split(" ", 1)[0].rstrip(".")
    try:
        return float(head), title
    except ValueError:
        return 99.0, title


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def _early_threads(argv: list[str]) -> None:
    """Thread limits must be in the environment before torch/JAX start their pools."""
    for i, a in enumerate(argv):
        value = None
        if a == "--threads" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--threads="):
            value = a.split("=", 1)[1]
        if value is not None and value.isdigit():
            from benchmarks._timing import limit_threads_env

            limit_threads_env(int(value))


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    chosen = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [c for c in chosen if c not in allowed]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"{flag} takes a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return chosen


def _optimizers(text: str) -> tuple[str, ...]:
    from examples.optimizers import TORCH_OPTIMIZERS

    return _choices(text, tuple(TORCH_OPTIMIZERS), "--optimizers")


def _sections(text: str) -> tuple[str, ...]:
    return _choices(text, SECTION_NAMES, "--sections")


def _backends(text: str) -> tuple[str, ...]:
    return _choices(text, ("torch", "jax"), "--backends")


def _budget(text: str) -> Any:
    from benchmarks.accuracy import parse_budget

    return parse_budget(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="the quick run (the default): every section with fewer repeats "
                           "and smaller models, a budget of 300 s on 2 CPU cores (BUDGET_S)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the full run: the figures to quote (about 15 minutes on 2 CPU "
                           "cores, plus the accuracy section and the m-sharpness section at "
                           "WRN-16-2 size, which alone took about 50 minutes on a busy "
                           "2-core machine)")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="tiny sizes and one or two repeats: checks that the job runs "
                           "(the tests' mode), its figures mean nothing")
    mode.add_argument("--gpu", dest="mode", action="store_const", const="gpu",
                      help="the GPU job: the full run on --device cuda (default cuda) at GPU "
                           "sizes, every section but accuracy, then the CUDA tests; one folder "
                           "runs/gpu-YYYYmmdd-HHMMSS/ (exits with a message without CUDA)")
    p.set_defaults(mode="quick")
    p.add_argument("--data-dir", default=None,
                   help="folder with cifar-10-batches-py/ or cifar-10-python.tar.gz "
                        "(default: look in ./data, ~/data, ~/.cache/cifar10, /data, /datasets "
                        "and data/ in the clone)")
    p.add_argument("--budget", type=_budget, default=None,
                   help="accuracy budget: smoke, quick, small, default, long or "
                        "epochs=..,width=..,subset=.. (default: the run mode's: smoke, quick "
                        "or default)")
    p.add_argument("--out", default=None,
                   help="output folder (default: a new runs/compare-YYYYmmdd-HHMMSS/ in the "
                        "clone, ignored by git; --out benchmarks/results updates the "
                        "committed results)")
    p.add_argument("--skip-accuracy", action="store_true", help="skip the accuracy section")
    p.add_argument("--optimizers", type=_optimizers, default=("sgd", "sam", "asam"),
                   help="accuracy section: SGD, SAM and ASAM always, plus any SAM-family "
                        "variant of examples/optimizers.py (torch), e.g. gsam,looksam,msam")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats of the overhead section (the step section uses half of "
                        "it, at least 3); default: the run mode's")
    p.add_argument("--sections", type=_sections, default=None,
                   help=f"comma-separated subset of {','.join(SECTION_NAMES)} (default: all "
                        "but gpu; with --gpu: all but accuracy)")
    p.add_argument("--backends", type=_backends, default=("torch", "jax"),
                   help="torch,jax (default) or one of them; the overhead section is torch's")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/XLA threads (default: what the libraries pick)")
    p.add_argument("--device", default=None,
                   help="torch device of the torch sections (cpu, cuda, cuda:1, ...); on a GPU "
                        "the full run's whole step uses WRN-16-8 at batch 128. JAX uses its "
                        "default backend (its GPU when jax[cuda] is installed). Default: cpu "
                        "(cuda with --gpu)")
    p.add_argument("--no-cache", action="store_true",
                   help="no persistent JAX compilation cache (default: compiled executables "
                        "are kept in runs/.cache/jax/ in the clone, or $SAM_BENCH_CACHE_DIR, "
                        "so a second run skips XLA compilation; SAM_BENCH_CACHE=0 also turns "
                        "it off)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off anyway when stderr is not a terminal)")
    return p


def resolve_mode(args: argparse.Namespace, torch: Any) -> bool:
    """Turn ``--gpu`` into what it runs (the full run on CUDA) and fill
    the defaults of ``--device`` and ``--sections``; ``True`` for the GPU job (its sections:
    every one but :data:`NOT_IN_GPU_JOB`). Without a CUDA
    device the GPU job stops here, before anything is measured or written."""
    gpu_job = args.mode == "gpu"
    if gpu_job:
        if not torch.cuda.is_available():
            build = (f"a CUDA {torch.version.cuda} build" if torch.version.cuda
                     else "a CPU-only build")
            raise SystemExit(
                f"--gpu needs a CUDA device, and torch {torch.__version__} ({build}) sees none "
                "(torch.cuda.is_available() is False). On this machine run the CPU job, "
                "`python benchmarks/compare.py` (or --full); on a machine with an NVIDIA GPU, "
                "install a CUDA build of torch and run --gpu there.")
        args.mode = "full"
        args.device = args.device or "cuda"
        if torch.device(args.device).type != "cuda":
            raise SystemExit(f"--gpu runs on a CUDA device; --device {args.device} is not one "
                             "(leave --device out, or give cuda:N)")
    args.device = args.device or "cpu"
    if args.sections is None:
        args.sections = tuple(s.name for s in SECTIONS if (
            s.name not in NOT_IN_GPU_JOB if gpu_job else s.default))
    return gpu_job


def run_cuda_tests(out: Path) -> dict[str, Any]:
    """The GPU job's tests (``pytest -m cuda``) in a fresh interpreter: exit status, summary
    line and seconds; the whole output goes to ``out/cuda-tests.txt``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True,
                              timeout=GPU_TESTS_TIMEOUT_S)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = None
        text = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {GPU_TESTS_TIMEOUT_S} s"
    (out / "cuda-tests.txt").write_text(text, encoding="utf-8")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return {"command": "python -m pytest -q " + " ".join(GPU_TESTS), "returncode": rc,
            "summary": lines[-1] if lines else "(no output)",
            "seconds": time.perf_counter() - t0, "output": "cuda-tests.txt"}


def cache_folder(args: argparse.Namespace) -> Path | None:
    """The persistent compilation cache's folder, or ``None`` when it is turned off."""
    if args.no_cache or os.environ.get("SAM_BENCH_CACHE", "1").strip().lower() in (
            "0", "false", "no", "off", ""):
        return None
    env = os.environ.get("SAM_BENCH_CACHE_DIR")
    return Path(os.path.expanduser(env)) if env else _ROOT / CACHE_DIR


def enable_jax_cache(folder: Path) -> dict[str, Any]:
    """Turn on JAX's persistent compilation cache in ``folder``, for every program however
    small or quick to compile (the benchmarks' steps compile in well under JAX's default
    1-second threshold on a CPU). Compiled executables are deterministic given the program,
    the jax/jaxlib version and the machine, which is what JAX keys them on; a figure that
    times compilation (``compile_and_first_call_s``) reads as a cache load on a cached run.
    Returns what the report says of it."""
    import jax

    folder.mkdir(parents=True, exist_ok=True)
    entries = sum(1 for _ in folder.iterdir())
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return {"dir": shown_path(folder), "entries_before": entries}


def new_run_folder(parent: Path, now: float | None = None, prefix: str = "compare") -> Path:
    """A new, empty ``parent/<prefix>-YYYYmmdd-HHMMSS/`` (``-2``, ``-3``, ... if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        folder = parent / (f"{prefix}-{stamp}" if i == 1 else f"{prefix}-{stamp}-{i}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"no free run folder under {parent} for {stamp}")


def shown_path(path: str | Path) -> str:
    """A path as the report names it: relative to the clone when inside it, else a
    placeholder (the report never names a folder of the machine it ran on)."""
    p = Path(os.path.expanduser(str(path))).resolve()
    try:
        return p.relative_to(_ROOT).as_posix() or "."
    except ValueError:
        return "DIR"


def shown_command(argv: list[str]) -> str:
    """The command line with every path argument shown by :func:`shown_path`."""
    out, path_flags = [], ("--data-dir", "--out")
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if eq and flag in path_flags:
            a = f"{flag}={shown_path(value)}"
        elif (i > 0 and argv[i - 1] in path_flags) or a.startswith(("/", "~")):
            a = shown_path(a)
        out.append(a)
    return " ".join(["python benchmarks/compare.py", *out])


def make_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The plain dict every section's ``run(config, progress)`` receives (its keys are
    described in :mod:`benchmarks._common`)."""
    import torch

    return {
        "mode": args.mode,
        "device": args.device or "cpu",
        "backends": tuple(args.backends),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "data_dir": args.data_dir,
        "budget": args.budget,
        "optimizers": tuple(args.optimizers),
        "out": out,
    }


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None, *, started: float | None = None) -> dict[str, Any]:
    """Run the job; ``started`` is the ``time.perf_counter()`` the run's time counts from
    (the script passes its own start, before torch and JAX are imported)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _early_threads(argv)
    args = build_parser().parse_args(argv)

    import torch

    from benchmarks import _timing, report
    from benchmarks._common import jax_side, pytorch_optimizer
    from benchmarks._progress import Progress
    from benchmarks._timing import machine_info, peak_rss_bytes

    gpu_job = resolve_mode(args, torch)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise SystemExit(f"--device must be a torch device such as cpu or cuda, got "
                         f"{args.device!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device; use --device cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.out is None:
        out = new_run_folder(_ROOT / "runs", prefix="gpu" if gpu_job else "compare")
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter() if started is None else started
    config = make_config(args, out)
    _, po_err = pytorch_optimizer()
    results: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": shown_command(argv),
        "mode": args.mode,
        "out": shown_path(out),
        "machine": machine_info(torch.get_num_threads()),
        "device": str(device),
        "peers": {"pytorch_optimizer": po_err or "present"},
        "errors": {},
        "sections": [],
        "section_titles": {},
        "section_seconds": {},
        "notes": {},
    }
    cache = cache_folder(args)
    results["jax_cache"] = None
    if cache is not None and "jax" in args.backends and importlib.util.find_spec("jax"):
        try:
            results["jax_cache"] = enable_jax_cache(cache)
        except OSError as exc:  # an unwritable folder: run without the cache, and say so
            results["notes"]["jax_cache"] = f"no compilation cache ({exc})"
    budget = section_budgets(args.mode)
    results["budget_s"] = budget
    results["time_limit_s"] = QUICK_LIMIT_S if args.mode == "quick" else None
    results["rounds_cut"] = {}
    if "jax" in args.backends:
        J = jax_side()
        results["peers"]["jax"] = J.error or "present"
        if J.error is None:
            results["jax_device"] = str(J.jax.devices()[0])
            if gpu_job and J.jax.default_backend() != "gpu":
                # at GPU sizes on a CPU backend the JAX sections would run for an hour
                config["backends"] = tuple(b for b in config["backends"] if b != "jax")
                results["notes"]["jax"] = (
                    f"JAX sections not run: JAX's default backend is "
                    f"{J.jax.default_backend()!r}, not a GPU (install jax[cuda12] for them)")

    chosen = [s for s in SECTIONS if s.name in args.sections]
    loaded = {s.name: load_section(s) for s in chosen}
    # the progress bar's ETA: the quick run's budget, else each section's own estimate
    estimates = [(s.name, float(budget.get(s.name) or getattr(
        loaded[s.name][0], "ESTIMATE_S", {}).get(args.mode, 30)))
        for s in chosen if loaded[s.name][0] is not None]
    progress = Progress(estimates, enabled=False if args.no_progress else None)
    after: dict[str, int | None] = {}
    try:
        for section in chosen:
            module, note = loaded[section.name]
            title = _title(section.name, module)
            results["section_titles"][section.name] = title
            if module is None:
                results[section.name] = {"skipped": note}
                results["notes"][section.name] = note
                progress.write(f"[compare] {section.name}: skipped, {note}")
                continue
            if section.name == "accuracy" and args.skip_accuracy:
                results[section.name] = {"skipped": "--skip-accuracy"}
                continue
            t0 = time.perf_counter()
            cut_before = len(_timing.CUT_SHORT)
            box = budget.get(section.name) if time_boxed() else None
            with progress.section(section.name), _timing.time_box(box, min_rounds=MIN_ROUNDS):
                try:
                    results[section.name] = module.run(config, progress)
                except Exception as exc:
                    traceback.print_exc()
                    results["errors"][section.name] = f"{type(exc).__name__}: {exc}"
                    results[section.name] = {"skipped": f"error: {type(exc).__name__}: {exc}"}
            results["section_seconds"][section.name] = time.perf_counter() - t0
            if len(_timing.CUT_SHORT) > cut_before:
                results["rounds_cut"][section.name] = [
                    list(c) for c in _timing.CUT_SHORT[cut_before:]]
            after[section.name] = peak_rss_bytes()
    finally:
        progress.close()
    results["sections"] = sorted((s.name for s in chosen),
                                 key=lambda n: _order_key(results["section_titles"][n]))
    results["peak_memory"] = {"max_rss_bytes": peak_rss_bytes(), "after_section": after}
    if device.type == "cuda":
        results["peak_memory"]["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(
            device)
    if gpu_job:
        results["cuda_tests"] = run_cuda_tests(out)
    results["targets"] = [{"target": t, "measured": v, "holds": h}
                          for t, v, h in report.targets(results)]
    plots = report.make_plots(results, out)
    results["plots"] = plots
    results["seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default),
                                      encoding="utf-8")
    text = report.write_report(results, out, plots)
    skipped = results.get("accuracy", {}).get("skipped")
    if skipped:
        print(f"[compare] accuracy: {skipped}")
    if args.mode != "smoke" and "\n## " in text:  # the targets table
        print("## " + text.split("\n## ", 2)[1].rstrip())
    print("\n".join(report.time_lines(results)))
    print(f"[compare] {args.mode} run done in {results['seconds']:.0f} s; report: "
          f"{_for_terminal(out / 'report.md')} (results.json and {len(plots)} plots beside it)")
    if args.mode == "quick":
        print("[compare] this was the quick run; the figures to quote: "
              "python benchmarks/compare.py --full")
    return results


def section_budgets(mode: str) -> dict[str, float]:
    """Each section's time budget in seconds for a run in ``mode``: :data:`BUDGET_S` for the
    quick run, none for the others (the full run's figures need every repeat it asks for).
    ``SAM_BENCH_TIME_BOX=0`` keeps the budget as a yardstick but lets every section run all
    its repeats (to measure what a section takes untouched)."""
    if mode != "quick":
        return {}
    return {k: float(v) for k, v in BUDGET_S.items()}


def time_boxed() -> bool:
    """Whether the quick run's sections stop their repeats at their budget (the default)."""
    return os.environ.get("SAM_BENCH_TIME_BOX", "1").strip().lower() not in (
        "0", "false", "no", "off")


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return shown_path(obj)
    return str(obj)


def _for_terminal(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def section_config(mode: str = "smoke", **overrides: Any) -> Mapping[str, Any]:
    """A config for calling one section's ``run`` directly (tests, notebooks)."""
    config = {"mode": mode, "device": "cpu", "backends": ("torch", "jax"), "threads": 1,
              "repeats": None, "data_dir": None, "budget": None,
              "optimizers": ("sgd", "sam", "asam"), "out": Path(".")}
    config.update(overrides)
    return config


if __name__ == "__main__":
    main(started=_STARTED)
