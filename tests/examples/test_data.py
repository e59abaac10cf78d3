"""The NumPy CIFAR pipeline: official file layouts, tarball and download handling,
normalization, augmentation (checked against a replay of its random draws) and batches."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examples import data
from examples.cli import lr_at, step_milestones
from tests.examples.conftest import write_cifar


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("str_keys", [False, True])
def test_reads_official_layout(tmp_path, dataset, str_keys):
    train_x, train_y = write_cifar(tmp_path, dataset, n_train=20, n_test=7, str_keys=str_keys)
    train, test, classes = data.load_cifar(tmp_path, dataset)
    assert classes == (10 if dataset == "cifar10" else 100)
    assert train.images.dtype == np.uint8 and train.images.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(train.images, train_x)
    np.testing.assert_array_equal(train.labels, train_y)
    assert len(test) == 7 and test.images.shape == (7, 32, 32, 3)


def test_channel_major_rows_become_nhwc(tmp_path):
    """Row layout of the official files: 1024 red, then 1024 green, then 1024 blue values."""
    write_cifar(tmp_path, n_train=5, n_test=2)
    import pickle

    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    row = np.zeros((1, 3072), np.uint8)
    row[0, 1024 + 32 * 5 + 7] = 200  # green channel, row 5, column 7
    entry[b"data"], entry[b"labels"] = row, [3]
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    train, _, _ = data.load_cifar(tmp_path, "cifar10")
    assert train.images[0, 5, 7, 1] == 200 and train.images[0].sum() == 200


def test_extracts_tarball(tmp_path):
    src = tmp_path / "src"
    train_x, _ = write_cifar(src, n_train=10, n_test=3)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    train, _, _ = data.load_cifar(root, "cifar10")
    np.testing.assert_array_equal(train.images, train_x)
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()


def test_missing_data_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data-dir.*kriz/cifar\.html.*--download") as e:
        data.load_cifar(tmp_path, "cifar10")
    assert "make_cifar10" not in str(e.value)
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_cifar(tmp_path, "mnist")


def test_offline_download_fails_clearly(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match=r"could not download.*kriz/cifar\.html.*--data-dir"):
        data.load_cifar(tmp_path, "cifar10", download=True)
    assert not list(tmp_path.glob("*.tar.gz*"))


class _FakeResponse(io.BytesIO):
    def __init__(self, blob: bytes) -> None:
        super().__init__(blob)
        self.headers = {"Content-Length": str(len(blob))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _tarball_bytes(tmp_path: Path) -> bytes:
    src = tmp_path / "src"
    write_cifar(src, n_train=10, n_test=3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buf.getvalue()


def test_download_verifies_md5(tmp_path, monkeypatch):
    blob = _tarball_bytes(tmp_path)
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: _FakeResponse(blob))
    root = tmp_path / "root"
    with pytest.raises(RuntimeError, match="MD5 mismatch"):
        data.load_cifar(root, "cifar10", download=True)
    assert not list(root.glob("*.tar.gz*"))
    # With the checksum of these bytes registered, the same download is accepted.
    spec = data.DATASETS["cifar10"]
    patched = data.CifarSpec(**{**spec.__dict__, "md5": hashlib.md5(blob).hexdigest()})
    monkeypatch.setitem(data.DATASETS, "cifar10", patched)
    train, test, _ = data.load_cifar(root, "cifar10", download=True)
    assert len(train) == 10 and len(test) == 3


def test_normalize_matches_formula():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for name, mean, std in (
        ("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ("cifar100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ):
        expected = (images.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
        got = data.normalize(images, name)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _replay(images: np.ndarray, seed: int, pad: int = 4, cut: int = 16) -> np.ndarray:
    """Augmentation written pixel by pixel from the same draws (crop, flip, Cutout)."""
    rng = np.random.default_rng(seed)
    n = len(images)
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    centers = rng.integers(0, (32, 32), size=(n, 2))
    out = np.zeros_like(images)
    for k in range(n):
        padded = np.zeros((32 + 2 * pad, 32 + 2 * pad, 3), np.uint8)
        padded[pad : pad + 32, pad : pad + 32] = images[k]
        crop = padded[offsets[k, 0] : offsets[k, 0] + 32, offsets[k, 1] : offsets[k, 1] + 32]
        if flips[k]:
            crop = crop[:, ::-1]
        crop = crop.copy()
        cy, cx = centers[k]
        crop[
            max(cy - cut // 2, 0) : min(cy + cut // 2, 32),
            max(cx - cut // 2, 0) : min(cx + cut // 2, 32),
        ] = 0
        out[k] = crop
    return out


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 6))
def test_augment_equals_pixelwise_replay(seed, n):
    images = np.random.default_rng(seed + 1).integers(1, 256, (n, 32, 32, 3), dtype=np.uint8)
    got, mask = data.augment_with_mask(images, np.random.default_rng(seed))
    np.testing.assert_array_equal(got, _replay(images, seed))
    np.testing.assert_array_equal(data.augment(images, np.random.default_rng(seed)), got)
    assert got.shape == images.shape and got.dtype == np.uint8
    # Cutout zeroes at most 16 x 16 pixels, at least 8 x 8 (a corner-clipped square).
    area = mask.sum(axis=(1, 2))
    assert np.all((area >= 64) & (area <= 256))
    assert np.all(got[mask] == 0)


def test_batches_deterministic_and_backend_independent(cifar_dir):
    train, _, _ = data.load_cifar(cifar_dir, "cifar10")
    first = list(data.batches(train, 24, rng=data.epoch_rng(3, 1), train=True))
    again = list(data.batches(train, 24, rng=data.epoch_rng(3, 1), train=True))
    other = list(data.batches(train, 24, rng=data.epoch_rng(3, 2), train=True))
    assert [x.shape for x, _ in first] == [(24, 32, 32, 3)] * 2 + [(16, 32, 32, 3)]
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(first[0][0], other[0][0])
    # Every image appears once per epoch.
    np.testing.assert_array_equal(
        np.sort(np.concatenate([y for _, y in first])), np.sort(train.labels)
    )
    # Cutout pixels are the channel mean (0 after normalization), padding is black.
    x = first[0][0]
    assert (np.all(x == 0, axis=-1)).sum() >= 24 * 64
    black = data.normalize(np.zeros((1, 1, 1, 3), np.uint8))[0, 0, 0]
    assert np.any(np.all(x == black, axis=-1))
    # The batches the two scripts feed: torch gets NCHW, JAX NHWC, same numbers.
    import jax.numpy as jnp

    xt = torch.from_numpy(data.to_nchw(x))
    assert xt.shape == (24, 3, 32, 32)
    np.testing.assert_array_equal(xt.permute(0, 2, 3, 1).numpy(), np.asarray(jnp.asarray(x)))


def test_eval_batches_are_plain_normalized(cifar_dir):
    _, test, _ = data.load_cifar(cifar_dir, "cifar10")
    xs = np.concatenate([x for x, _ in data.batches(test, 10)])
    np.testing.assert_array_equal(xs, data.normalize(test.images))
    with pytest.raises(ValueError, match="needs rng"):
        next(data.batches(test, 10, train=True))


def test_lr_schedules():
    assert step_milestones(200) == [60, 120, 160]
    kw = {"lr": 0.1, "epochs": 200, "steps_per_epoch": 391}
    for epoch, expected in ((0, 0.1), (59, 0.1), (60, 0.02), (120, 0.004), (160, 0.0008)):
        assert lr_at(epoch * 391, schedule="step", **kw) == pytest.approx(expected)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(100 * 391, schedule="cosine", **kw) == pytest.approx(0.05)
    assert lr_at(200 * 391, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_optax_schedule_equals_torch_schedule(schedule):
    from argparse import Namespace

    from examples.optimizers import optax_schedule

    args = Namespace(lr=0.1, schedule=schedule, epochs=7)
    fn = optax_schedule(args, steps_per_epoch=3)
    for step in range(0, 7 * 3 + 2):
        expected = lr_at(step, lr=0.1, schedule=schedule, epochs=7, steps_per_epoch=3)
        # float32 cosine: 1 + cos(x) near x = pi loses ~1e-7 absolute.
        assert float(fn(step)) == pytest.approx(expected, rel=1e-6, abs=1e-8)
