"""CIFAR-10/100 in NumPy, shared by the PyTorch and the JAX examples.

One pipeline for both backends, so that a seed gives the *same* batches in ``train_torch.py``
and ``train_jax.py``: the images stay NHWC ``uint8`` until a batch is drawn; augmentation
(random crop with 4-pixel zero padding, horizontal flip, Cutout 16) runs on the ``uint8``
batch with a NumPy ``Generator``; normalization gives ``float32`` NHWC (torch transposes
to NCHW with :func:`to_nchw`).

The reader understands the official layouts, ``cifar-10-batches-py/`` (``data_batch_1..5``,
``test_batch``) and ``cifar-100-python/`` (``train``, ``test``): Python-2 pickles of dicts
with ``data`` an ``N x 3072`` channel-major ``uint8`` array and ``labels`` (CIFAR-10) or
``fine_labels`` (CIFAR-100). When the folder is missing it extracts the official tarball
found in the data directory, or downloads it (``download=True``) with a progress bar and
checks its MD5.

References: Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009;
DeVries & Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout",
2017.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "OFFICIAL_PAGE",
    "CifarSpec",
    "Split",
    "TrainingData",
    "augment",
    "augment_with_mask",
    "batches",
    "ensure_extracted",
    "epoch_rng",
    "fit_metrics",
    "label_noise",
    "load_cifar",
    "load_digits",
    "load_training_data",
    "normalize",
    "to_nchw",
]


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR dataset lives and how its files are named."""

    folder: str
    tarball: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


#: The official CIFAR page, named by the error messages.
OFFICIAL_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"

DATASETS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        tarball="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        tarball="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


@dataclass(frozen=True)
class Split:
    """Images (``N x 32 x 32 x 3`` ``uint8``, NHWC) and labels (``N`` ``int64``)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _spec(dataset: str) -> CifarSpec:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    return DATASETS[dataset]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, md5: str) -> None:
    from tqdm import tqdm

    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {url} ({err}). Without network access, fetch the official "
            f"tarball from {OFFICIAL_PAGE} elsewhere and pass --data-dir pointing at the "
            f"folder that holds {dest.name} or its extracted folder."
        ) from err
    got = _md5(partial)
    if got != md5:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"MD5 mismatch for {url}: expected {md5}, got {got}; the download is corrupt. "
            "Delete it and retry, or pass --data-dir with a verified copy."
        )
    partial.replace(dest)


def ensure_extracted(data_dir: str | os.PathLike[str], dataset: str, download: bool) -> Path:
    """Return the dataset folder inside ``data_dir``, extracting or downloading it if needed.

    Order: the extracted folder (``cifar-10-batches-py``/``cifar-100-python``) if present;
    else the official tarball in ``data_dir`` (extracted in place); else, with
    ``download=True``, the official tarball fetched with a progress bar and MD5-checked.

    Raises:
        FileNotFoundError: nothing found and ``download`` is False.
        RuntimeError: the download failed (offline) or its checksum is wrong.
    """
    spec = _spec(dataset)
    root = Path(data_dir)
    folder = root / spec.folder
    if folder.is_dir():
        return folder
    tar_path = root / spec.tarball
    if not tar_path.is_file():
        if not download:
            raise FileNotFoundError(
                f"{dataset} not found: the --data-dir folder {str(data_dir)!r} holds neither "
                f"{spec.folder}/ nor {spec.tarball}. Pass --data-dir pointing at a folder "
                f"holding one of them (the official download, {OFFICIAL_PAGE}), or pass "
                "--download to fetch the official tarball."
            )
        root.mkdir(parents=True, exist_ok=True)
        _download(spec.url, tar_path, spec.md5)
    tmp = root / (spec.folder + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tar_path, "r:gz") as tar:
        tar.extractall(tmp, filter="data")
    (tmp / spec.folder).replace(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = np.asarray(entry["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be N x 3072 uint8, got shape {data.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major -> NHWC
    return np.ascontiguousarray(images), np.asarray(entry[label_key], dtype=np.int64)


def load_cifar(
    data_dir: str | os.PathLike[str], dataset: str = "cifar10", *, download: bool = False
) -> tuple[Split, Split, int]:
    """Read CIFAR-10 or CIFAR-100 in the official pickle layout.

    Args:
        data_dir: the folder holding ``cifar-10-batches-py/`` / ``cifar-100-python/`` or the
            official tarball.
        dataset: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        download: fetch the official tarball when nothing is found locally.

    Returns:
        ``(train, test, num_classes)``; images NHWC ``uint8``.
    """
    spec = _spec(dataset)
    folder = ensure_extracted(data_dir, dataset, download)
    splits = []
    for files in (spec.train_files, spec.test_files):
        parts = [_read_batch(folder / name, spec.label_key) for name in files]
        splits.append(
            Split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        )
    return splits[0], splits[1], spec.num_classes


def _normalization(dataset: str) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
    if dataset == "digits":
        return DIGITS_MAX, DIGITS_MEAN, DIGITS_STD
    spec = _spec(dataset)
    return 255.0, spec.mean, spec.std


def normalize(images: np.ndarray, dataset: str = "cifar10") -> np.ndarray:
    r"""Per-channel standardization of NHWC ``uint8`` images to ``float32``.

    .. math:: x' = (x / x_{max} - \mu_c) / \sigma_c

    with :math:`x_{max} = 255` and the usual training-set channel means and standard
    deviations for CIFAR, :math:`x_{max} = 16` (the digits' 17 grey levels) and the mean and
    standard deviation of all 1,797 digits for ``"digits"``.
    """
    scale, mean, std = _normalization(dataset)
    mean_ = np.asarray(mean, np.float32)
    std_ = np.asarray(std, np.float32)
    return (images.astype(np.float32) / np.float32(scale) - mean_) / std_


def augment(
    images: np.ndarray, rng: np.random.Generator, *, pad: int = 4, cutout: int = 16
) -> np.ndarray:
    """Random crop (zero padding ``pad``), horizontal flip (p=0.5), Cutout (``cutout`` px).

    Works on NHWC ``uint8`` and returns ``uint8`` with the Cutout square set to 0.
    :func:`batches` applies the same draws but sets the square to 0 *after*
    :func:`normalize` (the channel mean), as the reference Cutout does.
    """
    return augment_with_mask(images, rng, pad=pad, cutout=cutout)[0]


def augment_with_mask(
    images: np.ndarray, rng: np.random.Generator, *, pad: int = 4, cutout: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`augment`, also returning the ``N x H x W`` boolean Cutout mask.

    Cutout zeroes a ``cutout x cutout`` square centered on a uniform pixel, clipped at the
    border (DeVries & Taylor). The random draws are, in this order, crop offsets, flips and
    Cutout centers, one vector each per batch, so a seed fixes the batch whatever the
    backend.
    """
    n, h, w, _ = images.shape
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    centers = rng.integers(0, (h, w), size=(n, 2))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)  # n x h
    cols = offsets[:, 1, None] + np.arange(w)  # n x w
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    half = cutout // 2
    y0 = np.clip(centers[:, 0] - half, 0, h)[:, None, None]
    y1 = np.clip(centers[:, 0] + half, 0, h)[:, None, None]
    x0 = np.clip(centers[:, 1] - half, 0, w)[:, None, None]
    x1 = np.clip(centers[:, 1] + half, 0, w)[:, None, None]
    ys = np.arange(h)[None, :, None]
    xs = np.arange(w)[None, None, :]
    mask = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    out = np.where(mask[..., None], np.uint8(0), out)
    return out, mask


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator for one epoch's shuffle and augmentation: a pure function of
    ``(seed, epoch)``, so resuming at an epoch boundary replays exactly."""
    return np.random.default_rng([seed, epoch])


def batches(
    split: Split,
    batch_size: int,
    *,
    dataset: str = "cifar10",
    rng: np.random.Generator | None = None,
    train: bool = False,
    augment: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images, labels)``: ``float32`` NHWC normalized images, ``int64`` labels.

    With ``train=True`` the order is shuffled and, with ``augment=True``, each batch
    augmented with ``rng``; the last batch may be smaller. Cutout pixels come out as exactly
    0 (the channel mean).

    Args:
        split: the images and labels.
        batch_size: images per batch.
        dataset: which mean/std :func:`normalize` uses.
        rng: the epoch's generator (:func:`epoch_rng`); required with ``train=True``.
        train: shuffle (training) or keep order, no augmentation (evaluation).
        augment: with ``train=True``, crop, flip and Cutout each batch (the CIFAR recipe);
            ``False`` only shuffles (the digits, the label-noise study's memorization regime).
    """
    if train and rng is None:
        raise ValueError("batches(train=True) needs rng, e.g. rng=epoch_rng(seed, epoch)")
    n = len(split)
    order = rng.permutation(n) if rng is not None and train else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        raw = split.images[idx]
        if train and augment and rng is not None:
            raw, mask = augment_with_mask(raw, rng)
            x = normalize(raw, dataset)
            x[mask] = 0.0
        else:
            x = normalize(raw, dataset)
        yield x, split.labels[idx]


def to_nchw(images: np.ndarray) -> np.ndarray:
    """NHWC -> NCHW (contiguous), the layout PyTorch convolutions expect."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------
# Label noise
# ---------------------------------------------------------------------------------------


def label_noise(
    labels: np.ndarray, fraction: float, *, seed: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric label noise: flip exactly ``round(fraction * N)`` labels to another class.

    The flipped examples are drawn uniformly without replacement; each gets a label drawn
    uniformly from the ``num_classes - 1`` classes other than its own (the "symmetric" noise
    of Foret et al., ICLR 2021, Table 4, where a fraction :math:`p` of the labels is wrong:
    :math:`P(\\tilde y = j \\mid y = i) = p / (K - 1)` for :math:`j \\ne i`). The draws are
    a pure function of ``seed`` (NumPy's ``default_rng``), so every optimizer and both
    backends see the same noisy labels; ``labels`` is not modified.

    Args:
        labels: 1-D integer array of classes in ``[0, num_classes)``.
        fraction: the fraction of labels to flip, in ``[0, 1]``.
        seed: a non-negative integer seeding the draws.
        num_classes: the number of classes ``K >= 2``.

    Returns:
        ``(noisy_labels, flipped_mask)``: a new ``int64`` array and a boolean mask, ``True``
        exactly where ``noisy_labels != labels``.

    Raises:
        ValueError: a fraction outside ``[0, 1]``, fewer than 2 classes, a label out of
            range, labels not 1-D, or a negative seed.
        TypeError: non-integer labels, seed or ``num_classes``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 to flip a label, got {num_classes}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)):
        raise TypeError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if not 0.0 <= float(fraction) <= 1.0:  # also rejects NaN
        raise ValueError(f"fraction must be in [0, 1] (e.g. 0.4 for 40% noise), got {fraction!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), got values in "
            f"[{labels.min()}, {labels.max()}]"
        )
    n = len(labels)
    n_flip = round(float(fraction) * n)
    rng = np.random.default_rng(int(seed))
    flipped_idx = rng.choice(n, size=n_flip, replace=False)
    # An offset in 1..K-1 added modulo K is a uniform draw among the K - 1 other classes.
    offsets = rng.integers(1, num_classes, size=n_flip)
    noisy = labels.astype(np.int64, copy=True)
    noisy[flipped_idx] = (noisy[flipped_idx] + offsets) % num_classes
    flipped = np.zeros(n, dtype=bool)
    flipped[flipped_idx] = True
    return noisy, flipped


# ---------------------------------------------------------------------------------------
# scikit-learn's digits
# ---------------------------------------------------------------------------------------

#: Grey levels of the digits run 0..16; mean and standard deviation of all 1,797 images
#: after dividing by 16.
DIGITS_MAX = 16.0
DIGITS_MEAN = (0.30526,)
DIGITS_STD = (0.37605,)
DIGITS_TEST_SIZE = 517
DIGITS_SPLIT_SEED = 0


def load_digits(
    *, test_size: int = DIGITS_TEST_SIZE, split_seed: int = DIGITS_SPLIT_SEED
) -> tuple[Split, Split, int]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download).

    The images become ``N x 8 x 8 x 1`` ``uint8`` (grey levels 0..16) and are split once by a
    permutation drawn from ``split_seed``: the first ``test_size`` images of it form the test
    set (default 517, leaving 1,280 = 10 batches of 128 for training, which any m-sharpness
    chunk size dividing 128 divides). The split does not depend on the training seed, so
    every run sees the same data.

    Reference: Alpaydin & Kaynak, "Optical Recognition of Handwritten Digits", UCI, 1998.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.asarray(bunch.images, dtype=np.uint8)[..., None]  # values are 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    if not 1 <= test_size < len(labels):
        raise ValueError(f"test_size must be in [1, {len(labels) - 1}], got {test_size}")
    order = np.random.default_rng(split_seed).permutation(len(labels))
    test_idx, train_idx = np.sort(order[:test_size]), np.sort(order[test_size:])
    return (
        Split(images[train_idx], labels[train_idx]),
        Split(images[test_idx], labels[test_idx]),
        10,
    )


# ---------------------------------------------------------------------------------------
# What a training run sees
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """The splits of one training run.

    Attributes:
        name: ``"digits"``, ``"cifar10"`` or ``"cifar100"`` (selects :func:`normalize`).
        train: training images with the labels the model is trained on (noisy ones where
            ``flipped`` is set).
        test: test images with their clean labels.
        num_classes: number of classes.
        clean_labels: the training labels before noise.
        flipped: boolean mask of the training examples whose label was flipped.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    clean_labels: np.ndarray
    flipped: np.ndarray


def _limit(split: Split, n: int | None) -> Split:
    return split if n is None else Split(split.images[:n], split.labels[:n])


def load_training_data(config: object) -> TrainingData:
    """Load what ``config`` (the scripts' arguments) asks for: ``dataset``, ``data_dir``,
    ``download``, ``limit_train``/``limit_test`` (first N images), then ``label_noise``
    (fraction of the used training labels flipped by :func:`label_noise` with
    ``noise_seed``). Test labels stay clean."""
    name = config.dataset  # type: ignore[attr-defined]
    if name == "digits":
        train, test, num_classes = load_digits()
    else:
        train, test, num_classes = load_cifar(
            config.data_dir,  # type: ignore[attr-defined]
            name,
            download=bool(getattr(config, "download", False)),
        )
    train = _limit(train, getattr(config, "limit_train", None))
    test = _limit(test, getattr(config, "limit_test", None))
    fraction = float(getattr(config, "label_noise", 0.0) or 0.0)
    if fraction > 0:
        noisy, flipped = label_noise(
            train.labels,
            fraction,
            seed=config.noise_seed,  # type: ignore[attr-defined]
            num_classes=num_classes,
        )
    else:
        noisy, flipped = train.labels, np.zeros(len(train), dtype=bool)
    return TrainingData(
        name, Split(train.images, noisy), test, num_classes, train.labels, flipped
    )


def fit_metrics(predictions: np.ndarray, data: TrainingData) -> dict[str, float | None]:
    """How far a model fits the noisy training labels, from its eval-mode predictions on
    the training set (in order).

    * ``noisy_fit``: among the flipped examples, the fraction predicted as their *noisy*
      label (memorized noise; ``None`` without noise);
    * ``clean_fit``: among the examples whose label was not flipped, the fraction predicted
      as that (correct) label.
    """
    predictions = np.asarray(predictions)
    labels, flipped = data.train.labels, data.flipped
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions must have shape {labels.shape} (one per training example), "
            f"got {predictions.shape}"
        )
    hit = predictions == labels
    return {
        "noisy_fit": float(hit[flipped].mean()) if flipped.any() else None,
        "clean_fit": float(hit[~flipped].mean()) if (~flipped).any() else None,
    }
