"""Section 9, mixed precision and host syncs: one training step of SAM under autocast
(bfloat16 with :class:`sam_torch.SAM`, float16 with :class:`sam_torch.ScaledSAM` and a
``GradScaler``) against the SGD step at the same precision, the peak device memory of each,
and the host synchronizations one SAM step makes.

Host syncs are counted on CUDA with ``torch.cuda.set_sync_debug_mode("warn")`` (each
synchronizing call warns once): the figure that matters off the CPU, where a sync stalls the
kernel queue. On a CPU there is no queue to stall and the count is reported as not
applicable. The section runs on any device; it is part of the GPU job
(``python benchmarks/compare.py --gpu``) and runs in a CPU job only when asked for with
``--sections gpu``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from benchmarks._common import (
    LR,
    MOMENTUM,
    RHO,
    WEIGHT_DECAY,
    device_of,
    sized,
    sync_for,
    torch_wrn,
)
from benchmarks._timing import interleaved_times, summarize

TITLE = "9. Mixed precision and host syncs"
#: WRN depth and width, batch, timed rounds and warm-up rounds per run mode; ``"gpu"`` is the
#: full run on a CUDA device (WRN-16-8 at batch 128, the GPU job's size). The smoke size is
#: the tests' on a CPU, where a float16 autocast step runs ~50x slower than a float32 one.
SIZES: dict[str, dict[str, int]] = {
    "smoke": {"depth": 10, "width": 1, "batch": 2, "repeats": 1, "warmup": 1},
    "quick": {"depth": 10, "width": 1, "batch": 32, "repeats": 3, "warmup": 1},
    "full": {"depth": 16, "width": 2, "batch": 64, "repeats": 10, "warmup": 2},
    "gpu": {"depth": 16, "width": 8, "batch": 128, "repeats": 30, "warmup": 3},
}
ESTIMATE_S = {"smoke": 8, "quick": 20, "full": 120}
#: Precisions measured: name -> autocast dtype (``None``: float32, no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {
    "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _steps(device: torch.device, size: Mapping[str, int], dtype: torch.dtype | None
           ) -> dict[str, Callable[[], Any]]:
    """``{"sgd": step, "sam": step}`` at one precision, each on its own copy of the model
    (the same initial weights); float16 drives both through a ``GradScaler``."""
    import sam_torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size["batch"], 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (size["batch"],), generator=gen).to(device)
    loss_fn = torch.nn.functional.cross_entropy
    torch.manual_seed(0)
    template, _ = torch_wrn(size["depth"], size["width"])
    scaled = dtype is torch.float16
    hyper = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}

    def model_copy() -> torch.nn.Module:
        model, _ = torch_wrn(size["depth"], size["width"])
        model.load_state_dict(template.state_dict())
        return model.to(device).train()

    sgd_model, sam_model = model_copy(), model_copy()
    sgd = torch.optim.SGD(sgd_model.parameters(), **hyper)
    sam = sam_torch.SAM(sam_model.parameters(), torch.optim.SGD, rho=RHO, **hyper)
    sgd_scaler = torch.amp.GradScaler(device.type, enabled=scaled)
    driver: Any = sam_torch.ScaledSAM(sam, torch.amp.GradScaler(device.type)) if scaled else sam

    def sgd_step() -> Any:
        sgd.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = loss_fn(sgd_model(x), y)
        sgd_scaler.scale(loss).backward()
        sgd_scaler.step(sgd)
        sgd_scaler.update()
        return loss

    def closure() -> Any:
        with _autocast(device, dtype):
            loss = loss_fn(sam_model(x), y)
        (driver.scale(loss) if scaled else loss).backward()
        return loss

    def sam_step() -> Any:
        return driver.step(closure)

    return {"sgd": sgd_step, "sam": sam_step}


def _peak_bytes(device: torch.device, fn: Callable[[], Any]) -> int | None:
    """CUDA's peak allocated bytes over one call of ``fn`` (``None`` off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def count_host_syncs(device: torch.device, fn: Callable[[], Any]) -> int | None:
    """How many synchronizing CUDA calls one call of ``fn`` makes (``None`` off CUDA): each
    warns once under ``torch.cuda.set_sync_debug_mode("warn")``."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def run(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    """``{"model", "device", "rows": {precision: {sgd_ms, sam_ms, ratio_to_sgd,
    sam_peak_bytes, sgd_peak_bytes, sam_host_syncs}}}`` (``None`` where not measurable)."""
    if "torch" not in config.get("backends", ("torch", "jax")):
        return {"skipped": "--backends jax (this section is torch's)"}
    device = device_of(config)
    size = sized(config, SIZES)
    repeats = int(config.get("repeats") or size["repeats"])
    rows: dict[str, Any] = {}
    bar = progress.tick(len(PRECISIONS) * (size["warmup"] + repeats),
                        "precisions, timed rounds")
    for name, dtype in PRECISIONS.items():
        fns = _steps(device, size, dtype)
        times = interleaved_times(fns, repeats=repeats, warmup=size["warmup"],
                                  sync=sync_for(device), on_round=bar.update)
        sgd_ms, sam_ms = (summarize(times[k])["median_ms"] for k in ("sgd", "sam"))
        rows[name] = {
            "driver": "ScaledSAM + GradScaler" if dtype is torch.float16 else "SAM",
            "sgd_ms": sgd_ms, "sam_ms": sam_ms, "ratio_to_sgd": sam_ms / sgd_ms,
            "sgd_peak_bytes": _peak_bytes(device, fns["sgd"]),
            "sam_peak_bytes": _peak_bytes(device, fns["sam"]),
            "sam_host_syncs": count_host_syncs(device, fns["sam"]),
        }
    bar.close()
    return {
        "model": f"WRN-{size['depth']}-{size['width']}", "batch": size["batch"],
        "device": str(device), "repeats": repeats, "rows": rows,
        "definition": ("median step time over interleaved rounds; SAM is step(closure), two "
                       "forward-backward passes under the same autocast as its SGD row; "
                       "float16 rows scale the loss with a GradScaler (SGD) or ScaledSAM "
                       "(SAM); host syncs counted over one SAM step on CUDA"),
    }


def report(result: Mapping[str, Any]) -> list[str]:
    if "rows" not in result:
        return [f"Skipped: {result.get('skipped', 'not run')}.", ""]

    def mib(b: int | None) -> str:
        return "n/a" if b is None else f"{b / 2**20:.0f} MiB"

    lines = [
        f"{result['model']}, batch {result['batch']}, on {result['device']}, "
        f"{result['repeats']} timed rounds; {result['definition']}.", "",
        "| precision | SAM driver | SGD step | SAM step | SAM / SGD | peak memory SGD / SAM "
        "| host syncs per SAM step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        syncs = "n/a (CPU)" if r["sam_host_syncs"] is None else str(r["sam_host_syncs"])
        lines.append(f"| {name} | {r['driver']} | {r['sgd_ms']:.1f} ms | {r['sam_ms']:.1f} ms "
                     f"| {r['ratio_to_sgd']:.2f}x | {mib(r['sgd_peak_bytes'])} / "
                     f"{mib(r['sam_peak_bytes'])} | {syncs} |")
    return [*lines, ""]
