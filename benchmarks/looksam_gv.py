"""How long LookSAM's reused direction stays valid: SAM on the label-noise study's digits.

    python -m benchmarks.looksam_gv                      # 40 % noise, rho 0.1, 6 epochs
    python -m benchmarks.looksam_gv --epochs 3 --rho 0.05 --label-noise 0.0

LookSAM (Liu et al., CVPR 2022) computes on one step in k the component of SAM's gradient
orthogonal to the clean one, g_v = g_s - <g_s, g>/||g||^2 g, and reuses it on the next k - 1
steps as g + alpha ||g|| / ||g_v|| g_v, on the premise that g_v changes slowly. This trains
the study's digits CNN with plain SAM (torch, the examples' data and model, one thread) and
computes g_v on every step from the two gradients SAM computes anyway; it prints the mean
cosine between g_v at step t and at step t + lag (what a reuse step at that distance
assumes to be ~1) and the ratio ||g_v|| / ||g|| (what the reuse rule replaces by alpha).
"""

from __future__ import annotations

import argparse
import math
import statistics

__all__ = ["main", "measure"]


def measure(
    *, epochs: int, rho: float, label_noise: float, seed: int = 0, lags: tuple[int, ...] = (1, 2, 4, 8)
) -> dict[str, object]:
    """Train SAM and return the cosines of g_v at each lag and the ratios ||g_v|| / ||g||."""
    import torch
    import torch.nn.functional as F

    import sam_torch
    from benchmarks.label_noise import DATASET_SETTINGS
    from examples.cli import lr_at, make_config
    from examples.data import batches, epoch_rng, load_training_data, to_nchw
    from examples.train_torch import build_model

    torch.set_num_threads(1)
    settings = dict(DATASET_SETTINGS["digits"]["config"])
    settings.update(epochs=epochs, rho=rho, label_noise=label_noise, seed=seed,
                    optimizer="sam", rho_warmup_epochs=0.0)
    config = make_config(**settings)
    data = load_training_data(config)
    model = build_model(config, data)
    params = list(model.parameters())
    opt = sam_torch.SAM(params, torch.optim.SGD, rho=rho, lr=config.lr,
                        momentum=config.momentum, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    directions, ratios = [], []
    for epoch in range(epochs):
        model.train()
        for i, (x, y) in enumerate(batches(data.train, config.batch_size, dataset="digits",
                                           rng=epoch_rng(seed, epoch), train=True)):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + i, lr=config.lr,
                                    schedule=config.schedule, epochs=epochs,
                                    steps_per_epoch=steps_per_epoch)
            xt, yt = torch.from_numpy(to_nchw(x)), torch.from_numpy(y)
            F.cross_entropy(model(xt), yt).backward()
            g = torch.cat([p.grad.flatten() for p in params])
            opt.first_step(zero_grad=True)
            with sam_torch.disable_running_stats(model):
                F.cross_entropy(model(xt), yt).backward()
            g_s = torch.cat([p.grad.flatten() for p in params])
            opt.second_step(zero_grad=True)
            g_v = g_s - (g_s @ g) / (g @ g) * g
            directions.append(g_v / g_v.norm())
            ratios.append(float(g_v.norm() / g.norm()))
    cosines = {
        lag: statistics.fmean(
            float(directions[t] @ directions[t + lag]) for t in range(len(directions) - lag)
        )
        for lag in lags
    }
    return {"steps": len(ratios), "cosine_by_lag": cosines, "gv_to_g": ratios}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--label-noise", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = measure(epochs=args.epochs, rho=args.rho, label_noise=args.label_noise, seed=args.seed)
    ratios = sorted(out["gv_to_g"])  # type: ignore[arg-type]
    print(f"SAM, digits, {round(100 * args.label_noise)} % noise, rho {args.rho}, "
          f"{args.epochs} epochs ({out['steps']} steps, torch, 1 thread)")
    for lag, c in out["cosine_by_lag"].items():  # type: ignore[attr-defined]
        print(f"  mean cos(g_v(t), g_v(t + {lag})) = {c:.3f}")
    q = [ratios[int(f * (len(ratios) - 1))] for f in (0.1, 0.5, 0.9)]
    print(f"  ||g_v|| / ||g||: 10 % {q[0]:.3f}, median {q[1]:.3f}, 90 % {q[2]:.3f}")
    return out


if __name__ == "__main__":
    main()
