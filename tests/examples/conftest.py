"""Tiny CIFAR folders in the official pickle layout, written by the tests themselves."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest


def write_cifar(
    root: Path,
    dataset: str = "cifar10",
    n_train: int = 64,
    n_test: int = 32,
    seed: int = 0,
    str_keys: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Write a CIFAR-format folder; return the train images (NHWC uint8) and labels."""
    rng = np.random.default_rng(seed)
    classes = 10 if dataset == "cifar10" else 100
    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": (i - 1) * n_train // 5 for i in range(1, 6)}
        label_key = "labels"
    else:
        folder = root / "cifar-100-python"
        files = {"train": 0}
        label_key = "fine_labels"
    folder.mkdir(parents=True)

    def key(k: str) -> str | bytes:
        return k if str_keys else k.encode()

    def dump(path: Path, data: np.ndarray, labels: np.ndarray) -> None:
        entry = {key("data"): data, key(label_key): labels.tolist(), key("batch_label"): b"x"}
        if dataset == "cifar100":
            entry[key("coarse_labels")] = (labels // 5).tolist()
        with open(path, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    # A class-dependent mean colour so a model can learn something in a few steps.
    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, classes, n)
        base = (labels[:, None, None, None] * 23 + np.array([0, 80, 160])) % 256
        noise = rng.integers(-40, 41, (n, 32, 32, 3))
        return np.clip(base + noise, 0, 255).astype(np.uint8), labels

    train_x, train_y = images(n_train)
    bounds = [*files.values(), n_train]
    for (name, start), stop in zip(files.items(), bounds[1:], strict=True):
        chunk = train_x[start:stop].transpose(0, 3, 1, 2).reshape(stop - start, -1)
        dump(folder / name, chunk, train_y[start:stop])
    test_x, test_y = images(n_test)
    dump(
        folder / ("test_batch" if dataset == "cifar10" else "test"),
        test_x.transpose(0, 3, 1, 2).reshape(n_test, -1),
        test_y,
    )
    return train_x, train_y


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root)
    return root


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The training loops' ``threads`` setting is process-wide: put it back after each test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_jax_steps():
    """The JAX loop's compiled-step cache cleared before and after the test."""
    from examples import train_jax

    train_jax.make_steps.cache_clear()
    yield
    train_jax.make_steps.cache_clear()


def count_jax_forward_passes(patch: pytest.MonkeyPatch, batch_size: int) -> list[int]:
    """Count the forward passes the JAX loop's compiled steps run over training batches:
    ``train_jax.smoothed_cross_entropy`` is patched (through ``patch``, a ``monkeypatch`` or
    its ``context()``) to fire a debug callback each time a compiled program evaluates it on
    a batch of ``batch_size`` rows (the evaluation's batches differ in size). Returns the
    list the callbacks append to; call ``jax.effects_barrier()`` before reading it."""
    import jax

    from examples import train_jax

    calls: list[int] = []
    loss = train_jax.smoothed_cross_entropy

    def counted(logits, labels, smoothing):  # type: ignore[no-untyped-def]
        if logits.shape[0] == batch_size:
            jax.debug.callback(lambda: calls.append(1))
        return loss(logits, labels, smoothing)

    patch.setattr(train_jax, "smoothed_cross_entropy", counted)
    return calls
