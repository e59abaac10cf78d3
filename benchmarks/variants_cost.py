"""Cost of one training step of each SAM-family variant, as a ratio to a plain SGD step.

A full step is timed (forward, backward and optimizer, through ``optimizer.step(closure)``),
so the ratio includes the extra forward-backward passes, which dominate, and the optimizer
overhead. Each optimizer trains its own copy of the model; blocks of ``steps`` steps (a
multiple of ``k``, so LookSAM / every-k average their full and cheap steps) are timed in
turn, optimizer after optimizer, and the median block is reported. The closure calls per step are
counted as well (the pass count, deterministic, unlike the timings).

    python benchmarks/variants_cost.py                 # torch, small BN conv net, CPU
    python benchmarks/variants_cost.py --threads 1 --steps 20 --repeats 5
    python benchmarks/variants_cost.py --backend jax   # the optax transformations, jitted

The JAX run uses the same network with GroupNorm in place of BatchNorm (no batch
statistics to thread through); its pass count is the clean pass (none for Momentum-SAM)
plus the ``grad_fn`` calls, counted as the jitted step is traced (the program that is then
compiled once and timed: each ``grad_fn`` call in it is one forward-backward pass per
step); the ``lax.cond`` forms, whose trace holds both branches, are counted at run time
with ``jax.debug.callback`` on a tiny copy of the network, untimed.
LookSAM / every-k run twice: with ``full_step`` chosen in Python (two jitted steps, the
fast form on CPU) and with the default ``lax.cond`` (``,cond``), whose convolutions XLA:CPU
runs through a slow path.

Within the main job's time box (:func:`benchmarks._timing.time_box`) the timed blocks stop
once the section's budget is spent, after at least its minimum count.

Timings on a shared machine are noisy: compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sam_torch  # noqa: E402
from benchmarks._timing import interleaved_times  # noqa: E402

K_DEFAULT = 5
#: Rows of the JAX table (``jax_results``): SGD, eight variants and the two ``lax.cond`` forms.
JAX_VARIANTS = 12


def make_model(width: int) -> nn.Module:
    def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    return nn.Sequential(
        block(3, width, 1),
        block(width, width, 1),
        block(width, 2 * width, 2),
        block(2 * width, 2 * width, 1),
        block(2 * width, 4 * width, 2),
        block(4 * width, 4 * width, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, 10),
    )


def optimizers(k: int) -> dict[str, Callable[[nn.Module], Any]]:
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    return {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), **sgd),
        "sam": lambda m: sam_torch.SAM(m.parameters(), torch.optim.SGD, rho=0.05, **sgd),
        "gsam": lambda m: sam_torch.GSAM(m.parameters(), torch.optim.SGD, alpha=0.2, **sgd),
        "wsam": lambda m: sam_torch.WSAM(m.parameters(), torch.optim.SGD, gamma=0.88, **sgd),
        "samon": lambda m: sam_torch.SAMON(
            m.parameters(), torch.optim.SGD, rho=0.5, norm_params=m, **sgd
        ),
        "fsam": lambda m: sam_torch.FriendlySAM(m.parameters(), torch.optim.SGD, **sgd),
        "vasso": lambda m: sam_torch.VaSSO(m.parameters(), torch.optim.SGD, **sgd),
        f"looksam(k={k})": lambda m: sam_torch.LookSAM(m.parameters(), torch.optim.SGD, k=k, **sgd),
        f"everyk(k={k})": lambda m: sam_torch.EveryKSAM(
            m.parameters(), torch.optim.SGD, k=k, **sgd
        ),
        "msam": lambda m: sam_torch.MomentumSAM(m.parameters(), torch.optim.SGD, rho=0.3, **sgd),
    }


class Runner:
    """One model copy and its optimizer, with a closure that counts its calls."""

    def __init__(self, model: nn.Module, make_opt: Callable[[nn.Module], Any], x, y) -> None:
        self.model = copy.deepcopy(model)
        self.opt = make_opt(self.model)
        self.x, self.y = x, y
        self.calls = 0
        self.loss_fn = nn.CrossEntropyLoss()

    def closure(self) -> Any:
        self.calls += 1
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        return loss

    def block(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.opt.step(self.closure)
        return (time.perf_counter() - start) / steps


# ---------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------
def jax_results(
    args: argparse.Namespace,
    on_block: Callable[[], Any] | None = None,
    quiet: bool = False,
    names: tuple[str, ...] | None = None,
) -> dict[str, tuple[float, float]]:
    """Median seconds per jitted step and passes per step of each optax variant (of those in
    ``names`` when given; each step form compiles once, which dominates a short run on a CPU).

    ``on_block`` is called once per variant when its step(s) are compiled and warmed up,
    then once per timed round of every variant: ``len(rows) + repeats`` calls at most (the
    time box of :mod:`benchmarks._timing` may stop the rounds early).
    """
    tick = on_block or (lambda: None)
    import jax
    import optax
    from flax import linen as fnn

    import sam_jax

    def make_net(width: int) -> Any:
        class Net(fnn.Module):
            @fnn.compact
            def __call__(self, x: Any) -> Any:
                for c, stride in (
                    (width, 1),
                    (width, 1),
                    (2 * width, 2),
                    (2 * width, 1),
                    (4 * width, 2),
                    (4 * width, 1),
                ):
                    x = fnn.Conv(c, (3, 3), strides=stride, use_bias=False)(x)
                    x = fnn.relu(fnn.GroupNorm(num_groups=4)(x))
                return fnn.Dense(10)(x.mean(axis=(1, 2)))

        return Net()

    def problem(width: int, batch: int, side: int) -> tuple[Any, Any, Any, Any]:
        net = make_net(width)
        x = jax.random.normal(jax.random.PRNGKey(0), (batch, side, side, 3))
        y = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, 10)
        return net, x, y, net.init(jax.random.PRNGKey(2), x)["params"]

    net, x, y, params = problem(args.width, args.batch, 32)
    n_params = sum(a.size for a in jax.tree.leaves(params))
    if not quiet:
        print(
            f"model: GroupNorm conv net, {n_params} params, batch {args.batch}x32x32x3, "
            f"jax {jax.__version__}"
        )
    base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    k = args.k
    looksam_tx = optax.chain(sam_jax.looksam(0.05, k=k), base)
    everyk_tx = optax.chain(sam_jax.every_k_sam(0.05, k=k), base)
    # name: (transformation, clean pass?, static full_step schedule or None, uses lax.cond?)
    # keep JAX_VARIANTS (the row count a progress bar expects) in step with this table
    txs: dict[str, tuple[Any, bool | None, Callable[[int], bool] | None, bool]] = {
        "sgd": (base, False, None, False),
        "sam": (optax.chain(sam_jax.sam(0.05), base), True, None, False),
        "gsam": (optax.chain(sam_jax.gsam(0.05, alpha=0.2), base), True, None, False),
        "wsam": (sam_jax.wsam(0.05, gamma=0.88, base=base, learning_rate=0.05), True, None,
                 False),
        "samon": (optax.chain(sam_jax.samon(0.5), base), True, None, False),
        "fsam": (optax.chain(sam_jax.friendly_sam(0.05), base), True, None, False),
        "vasso": (optax.chain(sam_jax.vasso(0.05), base), True, None, False),
        f"looksam(k={k})": (looksam_tx, True, lambda i: i % k == 0, False),
        f"everyk(k={k})": (everyk_tx, True, lambda i: (i + 1) % k == 0, False),
        f"looksam(k={k},cond)": (looksam_tx, True, None, True),
        f"everyk(k={k},cond)": (everyk_tx, True, None, True),
        "msam": (optax.chain(sam_jax.momentum_sam(0.3, momentum=0.9), base), None, None,
                 False),
    }
    if names is not None:
        txs = {name: v for name, v in txs.items() if name in names}

    def make_step(net: Any, x: Any, y: Any, tx: Any, mode: bool | None, full: Any,
                  traced: list[int], ran: list[int] | None) -> Callable:
        """The step; ``traced`` counts the ``grad_fn`` calls as it is traced, ``ran`` (when
        given) as it runs, through ``jax.debug.callback``."""
        def loss_fn(p: Any) -> Any:
            traced.append(1)
            if ran is not None:
                jax.debug.callback(lambda: ran.append(1))
            logits = net.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grad_fn = jax.grad(loss_fn)

        def step(p: Any, state: Any) -> Any:
            grads = None if mode is None else grad_fn(p)  # MSAM needs no clean gradient
            extra = {} if mode is False else {"grad_fn": grad_fn}
            if full is not None:
                extra["full_step"] = full
            updates, state = tx.update(grads, state, p, **extra)
            return optax.apply_updates(p, updates), state

        return step

    def counted_at_run_time(tx: Any, mode: bool | None) -> float:
        """Passes per step of a ``lax.cond`` form, run ``steps`` steps on a tiny network."""
        tnet, tx_, ty, tparams = problem(4, 2, 8)
        ran: list[int] = []
        step = jax.jit(make_step(tnet, tx_, ty, tx, mode, None, [], ran))
        p, state = tparams, tx.init(tparams)
        for _ in range(args.steps):
            p, state = step(p, state)
        jax.block_until_ready(p)
        jax.effects_barrier()
        return len(ran) / args.steps

    class Runner:
        """A variant's step(s), each traced and compiled once, its parameters and state, and
        a Python step count."""

        def __init__(self, tx: Any, mode: bool | None, schedule: Any) -> None:
            fulls = (None,) if schedule is None else (True, False)
            state = tx.init(params)
            self.steps, self.passes = {}, {}
            for f in fulls:
                traced: list[int] = []
                lowered = jax.jit(make_step(net, x, y, tx, mode, f, traced, None)).lower(
                    params, state)
                self.passes[f] = len(traced)  # grad_fn calls in the program that runs
                self.steps[f] = lowered.compile()
            self.schedule = schedule
            self.p, self.state, self.i, self.total = params, state, 0, 0

        def block(self, n: int) -> Any:
            p, state = self.p, self.state
            for _ in range(n):
                full = None if self.schedule is None else self.schedule(self.i)
                p, state = self.steps[full](p, state)
                self.total += self.passes[full]
                self.i += 1
            self.p, self.state = p, state
            return p

    runners, passes = {}, {}
    for name, (tx, mode, schedule, cond) in txs.items():
        r = runners[name] = Runner(tx, mode, schedule)
        jax.block_until_ready(r.block(args.steps))  # warm-up
        passes[name] = (counted_at_run_time(tx, mode) if cond
                        else r.total / args.steps)  # the schedule's average over k steps
        tick()
    # interleaved, so that machine load drifts hit all alike
    times = interleaved_times({name: lambda r=r: r.block(args.steps)
                               for name, r in runners.items()},
                              repeats=args.repeats, warmup=0, sync=jax.block_until_ready,
                              on_round=tick)
    return {name: (statistics.median(times[name]) / args.steps, passes[name])
            for name in runners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backend", choices=("torch", "jax"), default="torch")
    parser.add_argument("--k", type=int, default=K_DEFAULT)
    parser.add_argument(
        "--steps", type=int, default=10, help="steps per timed block (a multiple of k)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.backend == "jax":
        report(jax_results(args))
        return
    report(torch_results(args))


def torch_results(
    args: argparse.Namespace,
    on_block: Callable[[], Any] | None = None,
    quiet: bool = False,
    table: dict[str, Callable[[nn.Module], Any]] | None = None,
) -> dict[str, tuple[float, float]]:
    """Median seconds per step and closure calls per step of each torch optimizer.

    ``args`` needs ``width``, ``batch``, ``k``, ``steps``, ``repeats`` and ``threads``;
    ``on_block`` is called after every round of blocks (one block of ``steps`` steps per
    optimizer): ``1 + repeats`` calls at most (a warm-up round, then the timed rounds, which
    the time box of :mod:`benchmarks._timing` may stop early).
    """
    tick = on_block or (lambda: None)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = make_model(args.width)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    n_params = sum(p.numel() for p in model.parameters())
    if not quiet:
        print(
            f"model: BN conv net, {n_params} params, batch {args.batch}x3x32x32, "
            f"{args.threads} thread(s), torch {torch.__version__}"
        )
    rows = optimizers(args.k) if table is None else table  # `table`: other rows, same timing
    runners = {name: Runner(model, make, x, y) for name, make in rows.items()}
    # A warm-up round (allocations, buffers, momentum), then rounds interleaved, so that
    # machine load drifts hit all alike; the time box may stop them early.
    times = interleaved_times({name: lambda r=r: r.block(args.steps)
                               for name, r in runners.items()},
                              repeats=args.repeats, warmup=1, on_round=tick)
    return {  # calls counted over every block, the warm-up's included
        name: (statistics.median(times[name]) / args.steps,
               r.calls / (args.steps * (1 + len(times[name]))))
        for name, r in runners.items()
    }


def report(results: dict[str, tuple[float, float]]) -> None:
    base = results["sgd"][0]
    print(f"{'optimizer':<20} {'ms/step':>8} {'x SGD':>6} {'passes/step':>12}")
    for name, (seconds, passes) in results.items():
        print(f"{name:<20} {1e3 * seconds:8.2f} {seconds / base:6.2f} {passes:12.2f}")


if __name__ == "__main__":
    main()
