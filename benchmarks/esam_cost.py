"""Cost of a training step of ESAM (torch) as a ratio to a plain SGD step and beside SAM's,
in the same run (the network and the timing of :mod:`benchmarks.variants_cost`: interleaved
blocks of steps, median, closure calls counted).

    python -m benchmarks.esam_cost --threads 1 --steps 10 --repeats 7

ESAM's closure returns per-example losses (``reduction="none"``) of the batch or of
``batch[index]``; the other rows use the usual mean-loss closure. Timings on a shared machine
are noisy: compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sam_torch
from benchmarks import variants_cost

SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def optimizers() -> dict[str, Callable[[nn.Module], Any]]:
    def esam(beta: float, gamma: float) -> Callable[[nn.Module], Any]:
        return lambda m: sam_torch.ESAM(
            m.parameters(), torch.optim.SGD, rho=0.05, beta=beta, gamma=gamma, seed=0, **SGD
        )

    return {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), **SGD),
        "sam": lambda m: sam_torch.SAM(m.parameters(), torch.optim.SGD, rho=0.05, **SGD),
        "esam(b=1,g=1)": esam(1.0, 1.0),
        "esam(b=.5,g=1)": esam(0.5, 1.0),
        "esam(b=.5,g=.5)": esam(0.5, 0.5),
        "esam(b=1,g=.25)": esam(1.0, 0.25),
    }


class Runner:
    """One model copy and its optimizer, with a closure that counts its calls."""

    def __init__(self, model: nn.Module, make_opt: Callable[[nn.Module], Any], x, y) -> None:
        self.model = copy.deepcopy(model)
        self.opt = make_opt(self.model)
        self.per_example = isinstance(self.opt, sam_torch.ESAM)
        self.x, self.y = x, y
        self.calls = 0
        self.loss_fn = nn.CrossEntropyLoss(reduction="none" if self.per_example else "mean")

    def closure(self, index: Any = None) -> Any:
        self.calls += 1
        x, y = (self.x, self.y) if index is None else (self.x[index], self.y[index])
        loss = self.loss_fn(self.model(x), y)
        if not self.per_example:
            self.opt.zero_grad()
            loss.backward()
        return loss

    def block(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            if isinstance(self.opt, torch.optim.SGD):
                self.closure()
                self.opt.step()
            else:
                self.opt.step(self.closure)
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = variants_cost.make_model(args.width)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: BN conv net, {n_params} params, batch {args.batch}x3x32x32, "
        f"{args.threads} thread(s), torch {torch.__version__}"
    )
    runners = {name: Runner(model, make, x, y) for name, make in optimizers().items()}
    for runner in runners.values():  # warm-up
        runner.block(args.steps)
        runner.calls = 0
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):  # interleaved, so that machine load drifts hit all alike
        for name, runner in runners.items():
            times[name].append(runner.block(args.steps))
    variants_cost.report({
        name: (statistics.median(times[name]), r.calls / (args.steps * args.repeats))
        for name, r in runners.items()
    })


if __name__ == "__main__":
    main()
