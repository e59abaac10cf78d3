"""Cost of a training step of BSAM, SAM with gradient centralization and the official-ASAM
groups, as a ratio to a plain SGD step in the same run (the network and the timing of
:mod:`benchmarks.variants_cost`: interleaved blocks, median, closure calls counted).

    python -m benchmarks.family_extra_cost --threads 1 --steps 10 --repeats 7

Timings on a shared machine are noisy: compare ratios from one run only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sam_torch
from benchmarks import variants_cost


def optimizers() -> dict[str, Callable[[nn.Module], Any]]:
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    return {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), **sgd),
        "sam": lambda m: sam_torch.SAM(m.parameters(), torch.optim.SGD, rho=0.05, **sgd),
        "sam(gc=True)": lambda m: sam_torch.SAM(
            m.parameters(), torch.optim.SGD, rho=0.05, gc=True, **sgd
        ),
        "asam(official groups)": lambda m: sam_torch.SAM(
            sam_torch.asam_param_groups(m), torch.optim.SGD, rho=0.5, **sgd
        ),
        "bsam": lambda m: sam_torch.BSAM(m.parameters(), num_data=50_000, lr=0.1, seed=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    ns = argparse.Namespace(k=1, **vars(args))
    variants_cost.report(variants_cost.torch_results(ns, table=optimizers()))


if __name__ == "__main__":
    main()
