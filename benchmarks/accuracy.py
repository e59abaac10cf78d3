"""Section 5, accuracy and loss landscape (when CIFAR-10 is found): SGD, SAM and ASAM (and any
SAM-family variant named in ``--optimizers``, torch) trained on a CIFAR-10 subset in both
backends, and a 1-D loss landscape through the SGD and SAM solutions (torch).

The training runs through :func:`train_torch` and :func:`train_jax`, one small function per
backend: the only places that know how a model is trained here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import sam_torch
from benchmarks._common import (
    ASAM_RHO,
    LR,
    MOMENTUM,
    RHO,
    WEIGHT_DECAY,
    jax_side,
    jax_unavailable,
    torch_wrn,
)

TITLE = "5. Accuracy"
ESTIMATE_S = {"smoke": 15, "quick": 75, "full": 1600}
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


def _lr_at(epoch_frac: float, epochs: int) -> float:
    return 0.5 * LR * (1.0 + math.cos(math.pi * epoch_frac / epochs))


def train_torch(kind: str, train: Any, test: Any, budget: Budget, data: Any,
                progress: Any = None) -> dict[str, Any]:
    """Train one torch run: ``{"history": [{"epoch", "test_loss", "test_acc"}], "seconds",
    "model"}``. ``kind`` is ``SGD``, ``SAM``, ``ASAM`` or a name of ``examples/optimizers.py``.

    The one place where this section trains a torch model (switch it here to the examples'
    training function once that is importable).
    """
    torch.manual_seed(0)
    model, _ = torch_wrn(budget.depth, budget.width)
    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    variant = kind not in ("SGD", "SAM", "ASAM")
    if kind == "SGD":
        opt: Any = torch.optim.SGD(model.parameters(), **kw)
    elif variant:  # a SAM-family variant through the examples' registry (docs/variants.md)
        from examples.optimizers import make_torch_optimizer

        ns = argparse.Namespace(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                nesterov=False, rho=RHO if kind != "msam" else 0.3, eta=0.01)
        opt = make_torch_optimizer(kind, model, ns)
    else:
        adaptive = kind == "ASAM"
        opt = sam_torch.SAM(model.parameters(), torch.optim.SGD,
                            rho=ASAM_RHO if adaptive else RHO, adaptive=adaptive, **kw)
    history = []
    steps_per_epoch = math.ceil(len(train) / budget.batch)
    t0 = time.perf_counter()
    for epoch in _epochs(progress, budget.epochs, f"torch {kind}"):
        model.train()
        rng = data.epoch_rng(0, epoch)
        for i, (xb, yb) in enumerate(data.batches(train, budget.batch, rng=rng, train=True)):
            for g in opt.param_groups:
                g["lr"] = _lr_at(epoch + i / steps_per_epoch, budget.epochs)
            x, y = torch.from_numpy(data.to_nchw(xb)), torch.from_numpy(yb)
            if variant:
                calls = [0]

                def closure(x: torch.Tensor = x, y: torch.Tensor = y,
                            calls: list[int] = calls) -> torch.Tensor:
                    # BatchNorm statistics from the first pass of the step only
                    calls[0] += 1
                    opt.zero_grad()
                    with (sam_torch.disable_running_stats(model) if calls[0] > 1
                          else contextlib.nullcontext()):
                        loss = F.cross_entropy(model(x), y)
                        loss.backward()
                    return loss

                opt.step(closure)
                continue
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if kind == "SGD":
                opt.step()
            else:
                opt.first_step(zero_grad=True)
                with sam_torch.disable_running_stats(model):
                    F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
        history.append(_eval_torch(model, test, budget, data) | {"epoch": epoch + 1})
    return {"history": history, "seconds": time.perf_counter() - t0, "model": model}


@torch.no_grad()
def _eval_torch(model: torch.nn.Module, split: Any, budget: Budget, data: Any) -> dict[str, float]:
    model.eval()
    loss = correct = n = 0.0
    for xb, yb in data.batches(split, 500):
        logits = model(torch.from_numpy(data.to_nchw(xb)))
        y = torch.from_numpy(yb)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        n += len(yb)
    return {"test_loss": loss / n, "test_acc": correct / n}


def train_jax(kind: str, train: Any, test: Any, budget: Budget, data: Any,
              progress: Any = None) -> dict[str, Any]:
    """Train one JAX run (``SGD``, ``SAM`` or ``ASAM``): ``{"history", "seconds"}``.

    The one place where this section trains a Flax model (switch it here to the examples'
    training function once that is importable).
    """
    J = jax_side()
    jax, jnp, optax = J.jax, J.jnp, J.optax
    model = J.WideResNet(budget.depth, budget.width)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    steps_per_epoch = math.ceil(len(train) / budget.batch)
    schedule = optax.cosine_decay_schedule(LR, budget.epochs * steps_per_epoch)
    adaptive = kind == "ASAM"
    steps = J.steps(model, ASAM_RHO if adaptive else RHO, adaptive, schedule, WEIGHT_DECAY)
    name = "optax.sgd" if kind == "SGD" else "sam_jax"
    step, tx = steps[name], steps[name + ":tx"]
    params, stats = variables["params"], variables["batch_stats"]
    state = tx.init(params)

    @jax.jit
    def evaluate(params: Any, stats: Any, x: Any, y: Any) -> tuple[Any, Any]:
        logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
        return loss, (logits.argmax(-1) == y).sum()

    history = []
    t0 = time.perf_counter()
    for epoch in _epochs(progress, budget.epochs, f"jax {kind}"):
        rng = data.epoch_rng(0, epoch)
        for xb, yb in data.batches(train, budget.batch, rng=rng, train=True):
            params, stats, state, _ = step(params, stats, state, jnp.asarray(xb), jnp.asarray(yb))
        loss = correct = n = 0.0
        for xb, yb in data.batches(test, 500):
            lo, co = evaluate(params, stats, jnp.asarray(xb), jnp.asarray(yb))
            loss, correct, n = loss + float(lo), correct + float(co), n + len(yb)
        history.append({"epoch": epoch + 1, "test_loss": loss / n, "test_acc": correct / n})
    return {"history": history, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def loss_landscape(model: torch.nn.Module, split: Any, data: Any, alphas: np.ndarray,
                   seed: int = 0) -> list[float]:
    """Loss along a filter-normalized random direction (Li et al., NeurIPS 2018).

    .. math:: L(w + \\alpha d), \\quad d_f \\leftarrow d_f \\, \\lVert w_f \\rVert / \\lVert d_f \\rVert

    per filter :math:`f` of every weight with more than one dimension; biases and
    batch-norm parameters are not moved (:math:`d = 0`).
    """
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    origin = [p.detach().clone() for p in params]
    dirs = []
    for w in origin:
        if w.dim() <= 1:
            dirs.append(torch.zeros_like(w))
            continue
        d = torch.randn(w.shape, generator=gen, dtype=w.dtype)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        dn = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        dirs.append(d * (wn / dn).reshape(-1, *([1] * (w.dim() - 1))))
    losses = []
    model.eval()
    for a in alphas:
        for p, w, d in zip(params, origin, dirs, strict=True):
            p.copy_(w + float(a) * d)
        total, n = 0.0, 0
        for xb, yb in data.batches(split, 500):
            logits = model(torch.from_numpy(data.to_nchw(xb)))
            total += float(F.cross_entropy(logits, torch.from_numpy(yb), reduction="sum"))
            n += len(yb)
        losses.append(total / n)
    for p, w in zip(params, origin, strict=True):
        p.copy_(w)
    return losses


def run(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    data_dir = config.get("data_dir")
    found = find_cifar(data_dir)
    if found is None:
        where = ("the folder given by --data-dir" if data_dir
                 else ", ".join(_shown(c) for c in CANDIDATE_DATA_DIRS))
        return {"skipped": f"CIFAR-10 not found (looked in {where}). Put "
                           "cifar-10-batches-py/ or cifar-10-python.tar.gz in a folder and run "
                           "python benchmarks/compare.py --data-dir FOLDER"}
    from examples import data

    train, test, _ = data.load_cifar(found, "cifar10")
    budget = config.get("budget") or BUDGETS[MODE_BUDGET[config.get("mode", "quick")]]
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(train))[: budget.subset]
    train = data.Split(train.images[idx], train.labels[idx])
    test = data.Split(test.images[: budget.test_subset], test.labels[: budget.test_subset])
    runs: dict[str, Any] = {}
    models = {}
    extra = [o for o in config.get("optimizers", ()) if o not in ("sgd", "sam", "asam")]
    for kind in ("SGD", "SAM", "ASAM", *extra):
        r = train_torch(kind, train, test, budget, data, progress)
        models[kind] = r.pop("model")
        runs[f"torch {kind}"] = r
        _log(progress, f"  torch {kind}: {r['history'][-1]} ({r['seconds']:.0f} s)")
    if not jax_unavailable(config):
        for kind in ("SGD", "SAM", "ASAM"):
            r = train_jax(kind, train, test, budget, data, progress)
            runs[f"jax {kind}"] = r
            _log(progress, f"  jax {kind}: {r['history'][-1]} ({r['seconds']:.0f} s)")
    full = config.get("mode") == "full"
    alphas = np.linspace(-1.0, 1.0, 21 if full else 11)
    n_probe = 1000 if full else 500
    probe = data.Split(train.images[:n_probe], train.labels[:n_probe])
    landscape = {k: loss_landscape(models[k], probe, data, alphas)
                 for k in progress(("SGD", "SAM"), desc="loss landscape")}
    return {"data": where_found(data_dir, found), "budget": dataclasses.asdict(budget),
            "runs": runs,
            "landscape": {"alphas": alphas.tolist(), "train_loss": landscape,
                          "model": "torch", "probe_images": len(probe)}}


def _epochs(progress: Any, epochs: int, desc: str) -> Any:
    return range(epochs) if progress is None else progress(range(epochs), desc=desc,
                                                           unit="epoch")


def _log(progress: Any, message: str) -> None:
    if progress is None:
        print(message, flush=True)
    else:
        progress.write(message)


