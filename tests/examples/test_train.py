"""The training scripts run SGD, SAM and ASAM on a tiny CIFAR-format folder, write metrics
and checkpoints, and resume exactly."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from examples import train_jax, train_torch

COMMON = [
    "--depth",
    "10",
    "--width",
    "1",
    "--batch-size",
    "16",
    "--limit-train",
    "48",
    "--limit-test",
    "32",
    "--epochs",
    "2",
    "--no-progress",
    "--threads",
    "1",
]



def _run(module, cifar_dir: Path, out: Path, optimizer: str, *extra: str) -> dict:
    return module.main(
        ["--data-dir", str(cifar_dir), "--out", str(out), "--optimizer", optimizer, *COMMON, *extra]
    )


def _check_metrics(out: Path, epochs: int, optimizer: str) -> list[dict]:
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == epochs
    for h, row in zip(history, rows, strict=True):
        assert float(row["test_acc"]) == pytest.approx(h["test_acc"])
        assert np.isfinite(h["train_loss"]) and 0 <= h["test_acc"] <= 1
        # Label-smoothed cross-entropy of a 10-class model starts near log(10).
        assert 0.3 < h["train_loss"] < 5
        if optimizer == "sgd":
            assert h["sharpness"] is None
        else:  # L(w + e) - L(w) > 0 for a nonzero perturbation on a fresh model
            assert h["sharpness"] > 0
    # The step schedule: milestones at epochs 1, 1, 2 of 2 -> 0.1 then 0.1 * 0.2 ** 2.
    assert history[0]["lr"] == pytest.approx(0.1)
    if epochs == 2:
        assert history[1]["lr"] == pytest.approx(0.1 * 0.2**2)
    return history


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "asam"])
def test_torch_script_runs_and_resumes_exactly(cifar_dir, tmp_path, optimizer):
    full = _run(train_torch, cifar_dir, tmp_path / "full", optimizer)
    _check_metrics(tmp_path / "full", 2, optimizer)
    part = tmp_path / "part"
    _run(train_torch, cifar_dir, part, optimizer, "--stop-after-epoch", "1")
    assert (part / "checkpoint.pt").is_file()
    _check_metrics(part, 1, optimizer)
    resumed = _run(train_torch, cifar_dir, part, optimizer, "--resume")
    assert resumed == {**full, "epoch_time_s": resumed["epoch_time_s"]}
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # bit-exact: weights and BatchNorm statistics
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "asam"])
def test_jax_script_runs_and_resumes_exactly(cifar_dir, tmp_path, optimizer):
    full = _run(train_jax, cifar_dir, tmp_path / "full", optimizer)
    _check_metrics(tmp_path / "full", 2, optimizer)
    part = tmp_path / "part"
    _run(train_jax, cifar_dir, part, optimizer, "--stop-after-epoch", "1")
    assert (part / "checkpoint.pkl").is_file()
    resumed = _run(train_jax, cifar_dir, part, optimizer, "--resume")
    assert resumed == {**full, "epoch_time_s": resumed["epoch_time_s"]}
    with open(tmp_path / "full" / "checkpoint.pkl", "rb") as f:
        a = pickle.load(f)["state"]
    with open(part / "checkpoint.pkl", "rb") as f:
        b = pickle.load(f)["state"]
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_missing_resume_file_is_an_error(cifar_dir, tmp_path):
    with pytest.raises(SystemExit, match="no such checkpoint"):
        _run(train_torch, cifar_dir, tmp_path, "sgd", "--resume", str(tmp_path / "nope.pt"))


def test_unknown_optimizer_names_the_registry(cifar_dir, tmp_path):
    with pytest.raises(ValueError, match="optimizer must be one of"):
        _run(train_torch, cifar_dir, tmp_path, "adamw")


SCHEDULE_RUN = ["--dataset", "digits", "--limit-train", "160", "--limit-test", "64",
                "--batch-size", "16", "--epochs", "2", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("optimizer", ["looksam", "everyk"])
def test_jax_script_static_full_step_schedule_equals_the_count_based_one(
    tmp_path, optimizer, monkeypatch
):
    """LookSAM / every-k: the script picks full or one-pass steps in Python (static
    ``full_step``, fast on XLA:CPU); the weights equal those of the variant's own
    count-based ``lax.cond`` schedule, so the Python schedule is the variant's."""
    import dataclasses

    from examples import optimizers

    entry = optimizers.OPTAX_OPTIMIZERS[optimizer]
    assert entry.full_step is not None

    def run(out):  # the digits' small CNN: 2 epochs of 10 steps, full steps 0, 5, 10, 15
        return train_jax.main([*SCHEDULE_RUN, "--optimizer", optimizer, "--out", str(out)])

    static = run(tmp_path / "static")
    train_jax.make_steps.cache_clear()
    monkeypatch.setitem(
        optimizers.OPTAX_OPTIMIZERS, optimizer, dataclasses.replace(entry, full_step=None)
    )
    dynamic = run(tmp_path / "cond")
    train_jax.make_steps.cache_clear()
    # Different jitted graphs (two static steps vs one lax.cond): equal up to float32 rounding.
    for key, value in dynamic.items():
        # passes: counted from the host-side schedule, which the lax.cond run does not have
        if key not in ("epoch_time_s", "passes_per_step") and isinstance(value, float):
            assert static[key] == pytest.approx(value, rel=1e-4), key
    with open(tmp_path / "static" / "checkpoint.pkl", "rb") as f:
        a = pickle.load(f)["state"]["params"]
    with open(tmp_path / "cond" / "checkpoint.pkl", "rb") as f:
        b = pickle.load(f)["state"]["params"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        # Two differently compiled float32 programs round differently (which element, and by
        # how much, depends on the CPU), and two epochs of training amplify that. So compare
        # each leaf as a whole relative to its own scale, not element by element against an
        # absolute constant: ||x - y|| <= 1e-2 ||y||. Measured on one CPU: at most 1.9e-6
        # over the leaves; the schedule shifted by one step: up to 1.12 (LookSAM) and 0.47
        # (every-k).
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.linalg.norm(x - y) <= 1e-2 * np.linalg.norm(y)


# ---------------------------------------------------------------------------------------
# The digits, label noise and m-sharpness
# ---------------------------------------------------------------------------------------

DIGITS = [
    "--dataset",
    "digits",
    "--epochs",
    "2",
    "--lr",
    "0.05",
    "--schedule",
    "cosine",
    "--label-smoothing",
    "0",
    "--label-noise",
    "0.4",
    "--no-progress",
    "--threads",
    "1",
]


@pytest.mark.parametrize("module", [train_torch, train_jax], ids=["torch", "jax"])
def test_scripts_train_sam_on_digits_with_label_noise_and_m_sharpness(module, tmp_path):
    out = tmp_path / "run"
    final = module.main(
        [*DIGITS, "--optimizer", "sam", "--m-sharpness", "8", "--out", str(out)]
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["args"]["m_sharpness"] == 8 and saved["args"]["label_noise"] == 0.4
    history = saved["history"]
    assert [h["epoch"] for h in history] == [1, 2] and history[-1] == {
        **final, "epoch_time_s": history[-1]["epoch_time_s"]}
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"noisy_fit", "clean_fit"} <= set(rows[0])
    for h in history:
        # 512 of the 1,280 training labels are flipped: fractions of 512 and of 768.
        assert h["noisy_fit"] * 512 == pytest.approx(round(h["noisy_fit"] * 512))
        assert h["clean_fit"] * 768 == pytest.approx(round(h["clean_fit"] * 768))
        assert 0 <= h["noisy_fit"] <= 1 and 0 <= h["clean_fit"] <= 1
        assert h["sharpness"] > 0 and np.isfinite(h["train_loss"])
    # Two epochs on the digits learn the clean labels far above chance (10 %), and the
    # model agrees with the clean labels more than with the noisy ones.
    assert history[-1]["clean_fit"] > 0.5 and history[-1]["test_acc"] > 0.5
    assert history[-1]["noisy_fit"] < history[-1]["clean_fit"]


def test_train_functions_write_nothing_without_out(tmp_path, monkeypatch):
    from examples.cli import make_config

    monkeypatch.chdir(tmp_path)
    seen = []
    config = make_config(dataset="digits", optimizer="sgd", epochs=1, label_noise=0.4,
                         threads=1)
    history = train_torch.train(config, progress=seen.append)
    assert seen == history and len(history) == 1 and history[0]["noisy_fit"] is not None
    assert list(tmp_path.iterdir()) == []


def test_digits_backends_start_equal_and_train_alike():
    """The same data, labels, initial weights and schedule: one epoch of SGD gives the same
    metrics in both backends up to float32 rounding of differently compiled programs."""
    from examples.cli import make_config

    config = make_config(dataset="digits", optimizer="sgd", epochs=1, label_noise=0.4,
                         lr=0.05, label_smoothing=0.0, threads=1)
    a, b = train_torch.train(config)[0], train_jax.train(config)[0]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-2)
    for key in ("test_acc", "noisy_fit", "clean_fit", "train_acc"):
        assert abs(a[key] - b[key]) < 0.02, key  # a few argmax ties at most


@pytest.mark.parametrize("module", [train_torch, train_jax], ids=["torch", "jax"])
def test_rho_warmup_longer_than_training_keeps_sam_at_sgd(module):
    """--rho-warmup-epochs ramps rho from 0 (sam_torch.RhoWarmup's formula in the torch loop,
    sam_jax.rho_warmup_schedule in the chain): with a ramp far longer than training, rho
    stays ~1e-10 and SAM follows SGD's trajectory; without it, rho 0.3 does not."""
    from examples.cli import make_config

    common = dict(dataset="digits", epochs=1, label_noise=0.4, lr=0.05, label_smoothing=0.0,
                  threads=1, seed=3)
    sgd = module.train(make_config(optimizer="sgd", **common))[0]
    ramped = module.train(
        make_config(optimizer="sam", rho=0.3, rho_warmup_epochs=1e9, **common)
    )[0]
    plain = module.train(make_config(optimizer="sam", rho=0.3, **common))[0]
    assert ramped["train_loss"] == pytest.approx(sgd["train_loss"], rel=1e-4)
    assert ramped["test_loss"] == pytest.approx(sgd["test_loss"], rel=1e-3)
    assert abs(ramped["sharpness"]) < 1e-4 < plain["sharpness"]
    assert abs(plain["train_loss"] - sgd["train_loss"]) > 1e-2


def test_rho_warmup_gives_the_same_numbers_in_both_backends():
    from examples.cli import make_config

    config = make_config(dataset="digits", optimizer="sam", rho=0.15, rho_warmup_epochs=1.5,
                         epochs=2, label_noise=0.4, lr=0.05, label_smoothing=0.0, threads=1)
    a, b = train_torch.train(config), train_jax.train(config)
    for ha, hb in zip(a, b, strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-3)
        assert ha["sharpness"] == pytest.approx(hb["sharpness"], rel=2e-2)
        assert abs(ha["test_acc"] - hb["test_acc"]) < 0.02


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizer", "sgd", "--rho-warmup-epochs", "2"],
         r"--rho-warmup-epochs ramps rho, so it needs a SAM-family --optimizer \(one of sam, "
         r"asam, gsam, .*\), got 'sgd'"),
        (["--optimizer", "sgd", "--alpha", "0.3"],
         "--alpha applies to --optimizer looksam or gsam, got 'sgd'"),
        (["--optimizer", "sam", "--rho-warmup-epochs", "-1"],
         "--rho-warmup-epochs must be >= 0, got -1.0"),
    ],
)
def test_rho_warmup_flag_errors(argv, message):
    from examples.cli import parse_args

    with pytest.raises(SystemExit, match=message):
        parse_args("test", argv)
