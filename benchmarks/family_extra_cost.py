"""Cost of a training step of SAM with gradient centralization, the official-ASAM groups,
BSAM, AE-SAM and ESAM, as a ratio to a plain SGD step in the same run, in torch and JAX.

    python -m benchmarks.family_extra_cost --backend both --threads 1 --steps 10 --repeats 15

The network is :mod:`benchmarks.variants_cost`'s (its BN conv net in torch, the same net with
GroupNorm in JAX), on one fixed batch; every row trains its own copy. Timing: blocks of
``steps`` steps, interleaved row after row (the order rotated every round, since the machine
is shared) after one warm-up block per row (the JIT compilation in JAX), the median block
reported (:func:`benchmarks._timing.interleaved_times`). Each step is the training loop's:

* SGD: one forward-backward and the base step; the SAM-family rows ``step(closure)`` in
  torch and ``tx.update(grads, ..., grad_fn=...)`` under ``jax.jit``.
* BSAM: both gradients through the closure / ``grad_fn`` (at the posterior sample and at the
  perturbed mean), no separate clean pass.
* AE-SAM: the perturbed pass only on the steps it chooses SAM: torch's ``step(closure)``
  calls the closure once on a plain step; ``sam_jax.ae_sam`` calls ``grad_fn`` inside a
  ``jax.lax.cond`` (its only jitted form: the decision needs the clean gradient, so it cannot
  be made on the host before the step, unlike LookSAM's ``full_step=``). Its SAM fraction
  depends on the gradient-norm statistics of this workload (one fixed batch, ``total_steps``
  = the steps each row runs); the passes column is what it did here.
* ESAM: the per-example loss contract (torch: ``closure(index=None)`` returning
  ``reduction="none"`` losses; JAX: ``loss_fn(params, index=None)`` and ``losses=``).

Passes per step are counted, not assumed: every loss evaluation is recorded as a
forward-backward or a forward without gradient, weighted by its share of the batch (ESAM's
perturbed backward on ``k = floor(gamma B)`` examples counts ``k / B``). Torch counts through
the closure over the timed blocks; JAX while the step is traced (each loss evaluation of
one step, in the one compiled program that is then timed; AE-SAM: ``1 + state.sam_count /
state.count`` over the timed blocks, its decisions being data dependent).

The output is a markdown table. Timings on a shared machine are noisy: compare ratios from
one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import sam_torch
from benchmarks import variants_cost
from benchmarks._timing import interleaved_times, limit_threads_env, machine_info

SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
NUM_DATA = 50_000  # BSAM's N: a CIFAR-sized training set
ESAM_BETA, ESAM_GAMMA = 0.5, 0.5

#: The rows, in table order: (label, torch form, JAX form).
ROWS: dict[str, tuple[str, str]] = {
    "SGD": ("`SGD(momentum=0.9)`", "`sgd(0.05, momentum=0.9)`"),
    "SAM": ("`SAM(rho=0.05)`", "`sam(0.05)`"),
    "GCSAM": ("`SAM(rho=0.05, gc=True)`", "`sam(0.05, gc=True)`"),
    "official ASAM": (
        "`SAM(asam_param_groups(model), rho=0.5)`",
        "`sam(0.5, adaptive=asam_mask, eps=1e-16)`",
    ),
    "BSAM": ("`BSAM(num_data=50000, lr=0.1)`", "`bsam(num_data=50000, lr=0.1)`"),
    "AE-SAM": ("`AESAM(total_steps=T)`", "`ae_sam(total_steps=T)`"),
    "ESAM": ("`ESAM(beta=0.5, gamma=0.5)`", "`esam(beta=0.5, gamma=0.5)`"),
}

# ---------------------------------------------------------------------------------------
# MESA / SAF go here once `sam_torch.MESA` / `sam_torch.SAF` and `sam_jax.mesa` /
# `sam_jax.saf` exist: a row label -> (torch form, JAX form) in EXTRA_ROWS, a factory in
# `torch_forms` (a `TorchForm`) and one in `jax_forms` (a `JaxForm`). MESA: one extra
# forward without backward per step (the EMA model's outputs); SAF: no extra pass (the data
# pipeline's example indices).
# ---------------------------------------------------------------------------------------
EXTRA_ROWS: dict[str, tuple[str, str]] = {}


def rows() -> dict[str, tuple[str, str]]:
    return {**ROWS, **EXTRA_ROWS}


def total_steps(args: argparse.Namespace) -> int:
    """AE-SAM's ``T``: the steps a row runs (a warm-up block and the timed ones)."""
    return args.steps * (1 + args.repeats)


# ---------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------
@dataclass
class TorchForm:
    """A torch row: the optimizer of a model, and whether its closure is ESAM's
    per-example one (``closure(index=None)`` returning unreduced losses, no backward)."""

    make: Callable[[nn.Module], Any]
    per_example: bool = False


def torch_forms(args: argparse.Namespace) -> dict[str, TorchForm]:
    forms = {
        "SGD": TorchForm(lambda m: torch.optim.SGD(m.parameters(), **SGD)),
        "SAM": TorchForm(
            lambda m: sam_torch.SAM(m.parameters(), torch.optim.SGD, rho=0.05, **SGD)
        ),
        "GCSAM": TorchForm(
            lambda m: sam_torch.SAM(m.parameters(), torch.optim.SGD, rho=0.05, gc=True, **SGD)
        ),
        "official ASAM": TorchForm(
            lambda m: sam_torch.SAM(sam_torch.asam_param_groups(m), torch.optim.SGD, rho=0.5, **SGD)
        ),
        "BSAM": TorchForm(
            lambda m: sam_torch.BSAM(m.parameters(), num_data=NUM_DATA, lr=0.1, seed=0)
        ),
        "AE-SAM": TorchForm(
            lambda m: sam_torch.AESAM(
                m.parameters(), torch.optim.SGD, rho=0.05, total_steps=total_steps(args), **SGD
            )
        ),
        "ESAM": TorchForm(
            lambda m: sam_torch.ESAM(
                m.parameters(), torch.optim.SGD, rho=0.05, beta=ESAM_BETA, gamma=ESAM_GAMMA,
                seed=0, **SGD,
            ),
            per_example=True,
        ),
    }
    return forms  # MESA / SAF: add their TorchForms here (see EXTRA_ROWS)


class TorchRunner(variants_cost.Runner):
    """:class:`benchmarks.variants_cost.Runner` (a model copy, its optimizer, the fixed
    batch) with the closure that counts forward-backward passes and gradient-free forwards
    in batch fractions, and ESAM's per-example closure."""

    def __init__(self, model: nn.Module, form: TorchForm, x: Any, y: Any) -> None:
        super().__init__(model, form.make, x, y)
        self.per_example = form.per_example
        if self.per_example:
            self.loss_fn = nn.CrossEntropyLoss(reduction="none")
        self.reset_counts()

    def reset_counts(self) -> None:
        self.calls, self.passes, self.forwards = 0, 0.0, 0.0

    def closure(self, index: Any = None) -> Any:
        self.calls += 1
        x, y = (self.x, self.y) if index is None else (self.x[index], self.y[index])
        share = len(x) / len(self.x)
        if torch.is_grad_enabled():
            self.passes += share
        else:
            self.forwards += share
        if self.per_example:  # ESAM's contract: per-example losses, no backward
            return self.loss_fn(self.model(x), y)
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return loss


def torch_results(
    args: argparse.Namespace, forms: dict[str, TorchForm] | None = None
) -> dict[str, tuple[float, float, float]]:
    """Median seconds per step, forward-backward passes and gradient-free forwards per step
    (counted over the timed blocks) of each torch row."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = variants_cost.make_model(args.width)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    forms = torch_forms(args) if forms is None else forms
    runners = {name: TorchRunner(model, form, x, y) for name, form in forms.items()}
    for r in runners.values():  # warm-up: allocations, buffers, momentum
        r.block(args.steps)
        r.reset_counts()
    times = interleaved_times(
        {name: (lambda r=r: r.block(args.steps)) for name, r in runners.items()},
        repeats=args.repeats, warmup=0,
    )
    n = args.steps * args.repeats
    return {
        name: (statistics.median(times[name]) / args.steps, r.passes / n, r.forwards / n)
        for name, r in runners.items()
    }


# ---------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------
@dataclass
class JaxForm:
    """A JAX row: its transformation and how the step calls it: ``"plain"`` (the clean
    gradient only), ``"sam"`` (the clean gradient and ``grad_fn``), ``"no_clean"`` (only
    ``grad_fn``, BSAM) or ``"per_example"`` (ESAM's ``loss_fn`` and ``losses=``)."""

    tx: Any
    call: str


def jax_forms(args: argparse.Namespace) -> dict[str, JaxForm]:
    import optax

    import sam_jax

    base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    forms = {
        "SGD": JaxForm(base, "plain"),
        "SAM": JaxForm(optax.chain(sam_jax.sam(0.05), base), "sam"),
        "GCSAM": JaxForm(optax.chain(sam_jax.sam(0.05, gc=True), base), "sam"),
        "official ASAM": JaxForm(
            optax.chain(sam_jax.sam(0.5, adaptive=sam_jax.asam_mask, eta=0.01, eps=1e-16), base),
            "sam",
        ),
        "BSAM": JaxForm(sam_jax.bsam(num_data=NUM_DATA, lr=0.1, seed=0), "no_clean"),
        "AE-SAM": JaxForm(
            optax.chain(sam_jax.ae_sam(0.05, total_steps=total_steps(args)), base), "sam"
        ),
        "ESAM": JaxForm(
            optax.chain(sam_jax.esam(0.05, beta=ESAM_BETA, gamma=ESAM_GAMMA, seed=0), base),
            "per_example",
        ),
    }
    return forms  # MESA / SAF: add their JaxForms here (see EXTRA_ROWS)


def jax_network(width: int, layers: int = 6) -> Any:
    """variants_cost's JAX network (GroupNorm conv net; its first ``layers`` convolutions:
    fewer only for the tests, whose compile time they set); defined here because
    :func:`benchmarks.variants_cost.jax_results` keeps it local."""
    from flax import linen as fnn

    spec = ((width, 1), (width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2), (4 * width, 1))

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x: Any) -> Any:
            for c, stride in spec[:layers]:
                x = fnn.Conv(c, (3, 3), strides=stride, use_bias=False)(x)
                x = fnn.relu(fnn.GroupNorm(num_groups=4)(x))
            return fnn.Dense(10)(x.mean(axis=(1, 2)))

    return Net()


def jax_results(
    args: argparse.Namespace, forms: dict[str, JaxForm] | None = None
) -> dict[str, tuple[float, float, float]]:
    """Median seconds per jitted step, forward-backward passes and gradient-free forwards
    per step of each JAX row."""
    import jax
    import optax

    net = jax_network(args.width, getattr(args, "layers", 6))
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.size, args.size, 3))
    y = jax.random.randint(jax.random.PRNGKey(1), (args.batch,), 0, 10)
    params = net.init(jax.random.PRNGKey(2), x)["params"]
    forms = jax_forms(args) if forms is None else forms

    def make_step(form: JaxForm, counter: list[tuple[bool, float]] | None) -> Callable:
        def count(grad: bool, n: int) -> None:
            # at trace time (n is static: the traced batch's size): one step's loss
            # evaluations, counted once per compiled program, not per call
            if counter is not None:
                counter.append((grad, n / args.batch))

        def per_example(p: Any, index: Any = None, grad: bool = True) -> Any:
            xb, yb = (x, y) if index is None else (x[index], y[index])
            count(grad, xb.shape[0])
            return optax.softmax_cross_entropy_with_integer_labels(
                net.apply({"params": p}, xb), yb
            )

        def mean_loss(p: Any) -> Any:
            return per_example(p).mean()

        grad_fn = jax.value_and_grad(mean_loss)

        def esam_loss_fn(p: Any, index: Any = None) -> Any:
            # ESAM evaluates the whole batch at w + e only for its selection (no gradient),
            # and differentiates the selected examples' mean
            return per_example(p, index, grad=index is not None)

        @jax.jit
        def step(p: Any, state: Any) -> Any:
            if form.call == "per_example":
                (_, losses), grads = jax.value_and_grad(
                    lambda q: _mean_and_losses(per_example(q)), has_aux=True
                )(p)
                updates, state = form.tx.update(
                    grads, state, p, loss_fn=esam_loss_fn, losses=losses
                )
            elif form.call == "no_clean":
                updates, state = form.tx.update(None, state, p, grad_fn=grad_fn)
            else:
                value, grads = grad_fn(p)
                extra = {} if form.call == "plain" else {"grad_fn": grad_fn, "value": value}
                updates, state = form.tx.update(grads, state, p, **extra)
            return optax.apply_updates(p, updates), state

        return step

    class Runner:
        def __init__(self, form: JaxForm, counter: Any = None) -> None:
            self.step = make_step(form, counter)
            self.p, self.state = params, form.tx.init(params)

        def block(self, n: int) -> None:
            p, state = self.p, self.state
            for _ in range(n):
                p, state = self.step(p, state)
            jax.block_until_ready(p)
            self.p, self.state = p, state

    passes: dict[str, tuple[float, float]] = {}
    runners: dict[str, Runner] = {}
    for name, form in forms.items():
        counter: list[tuple[bool, float]] = []
        runners[name] = Runner(form, counter)
        runners[name].block(1)  # traced and compiled once: the counter holds one step's
        first = list(counter)   # evaluations (a later retrace would add to it)
        passes[name] = (sum(s for g, s in first if g), sum(s for g, s in first if not g))
        runners[name].block(args.steps)  # warm up
    sam_counts = {name: _sam_count(r.state) for name, r in runners.items()}
    times = interleaved_times(
        {name: (lambda r=r: r.block(args.steps)) for name, r in runners.items()},
        repeats=args.repeats, warmup=0,
    )
    n = args.steps * args.repeats
    for name, r in runners.items():
        if sam_counts[name] is not None:  # AE-SAM: data-dependent, read from its state
            passes[name] = (1 + (_sam_count(r.state) - sam_counts[name]) / n, passes[name][1])
    return {
        name: (statistics.median(times[name]) / args.steps, *passes[name]) for name in runners
    }


def _mean_and_losses(losses: Any) -> tuple[Any, Any]:
    return losses.mean(), losses


def _sam_count(state: Any) -> int | None:
    """``sam_count`` of an AE-SAM state in a chain (``None`` for other forms)."""
    for s in state if isinstance(state, tuple) else (state,):
        if hasattr(s, "sam_count") and hasattr(s, "is_sam_step"):
            return int(s.sam_count)
    return None


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
def _passes(p: float, f: float) -> str:
    return f"{p:.2f}" if f == 0 else f"{p:.2f} + {f:.2f} fwd"


def table(results: dict[str, dict[str, tuple[float, float, float]]]) -> str:
    """The markdown table: per backend the passes per step (forward-backward, and forwards
    without gradient as ``+ n fwd``), ms per step and the ratio to that backend's SGD."""
    backends = list(results)
    names = {"torch": "torch", "jax": "JAX"}
    head = ["form", "torch", "JAX"]
    for b in backends:
        head += [f"{names[b]} passes / step", f"{names[b]} ms / step", f"{names[b]} x SGD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels = rows()
    for row in next(iter(results.values())):
        torch_form, jax_form = labels.get(row, ("", ""))
        cells = [row, torch_form, jax_form]
        for b in backends:
            seconds, p, f = results[b][row]
            base = results[b]["SGD"][0]
            cells += [_passes(p, f), f"{1e3 * seconds:.2f}", f"{seconds / base:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(args: argparse.Namespace, backends: list[str]) -> str:
    info = machine_info(args.threads)
    versions = ", ".join(
        f"{k} {info[k]}" for k in (("torch",) if backends == ["torch"] else ("torch", "jax"))
        if info.get(k)
    )
    return (
        f"{info['cpu']}, {info['logical_cpus']} logical CPUs, {args.threads} thread(s), "
        f"{versions}; variants_cost's conv net (width {args.width}; BatchNorm in torch, "
        f"GroupNorm in JAX), batch {args.batch}x{args.size}x{args.size}x3, median of {args.repeats} interleaved "
        f"blocks of {args.steps} steps; ESAM beta {ESAM_BETA}, gamma {ESAM_GAMMA}; AE-SAM "
        f"total_steps {total_steps(args)}"
    )


def run(args: argparse.Namespace) -> dict[str, dict[str, tuple[float, float, float]]]:
    backends = ["torch", "jax"] if args.backend == "both" else [args.backend]
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    for b in backends:
        results[b] = torch_results(args) if b == "torch" else jax_results(args)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "jax", "both"), default="both")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per row")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    limit_threads_env(args.threads)  # before JAX is imported
    started = time.perf_counter()
    results = run(args)
    print(describe(args, list(results)))
    print()
    print(table(results))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
