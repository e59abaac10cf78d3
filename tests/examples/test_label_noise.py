"""Label noise, the digits data and the flags around them: the ``label_noise`` contract
(exact count, always another class, uniform choice, determinism, input untouched), the
seeded digits split, ``fit_metrics`` and the command-line validation."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples import cli, data


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    num_classes=st.integers(2, 12),
    fraction=st.floats(0.0, 1.0, allow_nan=False),
    seed=st.integers(0, 2**32 - 1),
    label_seed=st.integers(0, 1000),
)
def test_label_noise_contract(n, num_classes, fraction, seed, label_seed):
    labels = np.random.default_rng(label_seed).integers(0, num_classes, n)
    before = labels.copy()
    noisy, flipped = data.label_noise(labels, fraction, seed=seed, num_classes=num_classes)
    np.testing.assert_array_equal(labels, before)  # input untouched
    assert noisy is not labels and noisy.dtype == np.int64 and flipped.dtype == bool
    assert noisy.shape == flipped.shape == (n,)
    assert flipped.sum() == round(fraction * n)  # exactly round(p N)
    np.testing.assert_array_equal(flipped, noisy != labels)  # flipped <=> another class
    np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])
    assert noisy.min(initial=0) >= 0 and noisy.max(initial=0) < num_classes
    again, again_mask = data.label_noise(labels, fraction, seed=seed, num_classes=num_classes)
    np.testing.assert_array_equal(again, noisy)  # deterministic in seed
    np.testing.assert_array_equal(again_mask, flipped)


def test_label_noise_draws_are_uniform():
    """Which examples flip and which class they get are uniform: over many seeds, every
    position flips with probability p and every other class is hit equally often
    (chi-square-sized bounds, fixed seeds: deterministic)."""
    n, k, p, seeds = 50, 5, 0.4, 2000
    labels = np.arange(n) % k
    position_counts = np.zeros(n)
    class_counts = np.zeros((k, k))
    for seed in range(seeds):
        noisy, flipped = data.label_noise(labels, p, seed=seed, num_classes=k)
        position_counts += flipped
        np.add.at(class_counts, (labels[flipped], noisy[flipped]), 1)
    # Each position: Binomial(2000, 0.4), mean 800, sd ~22; allow 5 sd.
    assert np.all(np.abs(position_counts - seeds * p) < 5 * np.sqrt(seeds * p * (1 - p)))
    assert np.all(np.diag(class_counts) == 0)
    off = class_counts[~np.eye(k, dtype=bool)].reshape(k, k - 1)
    expected = off.sum(axis=1, keepdims=True) / (k - 1)  # 4000 per class pair
    assert np.all(np.abs(off - expected) < 5 * np.sqrt(expected))


def test_label_noise_seed_changes_the_draws_and_matches_a_replay():
    labels = np.arange(40) % 10
    a, _ = data.label_noise(labels, 0.5, seed=1, num_classes=10)
    b, _ = data.label_noise(labels, 0.5, seed=2, num_classes=10)
    assert not np.array_equal(a, b)
    # The documented draws, replayed: positions without replacement, then offsets 1..K-1.
    rng = np.random.default_rng(1)
    idx = rng.choice(40, size=20, replace=False)
    expected = labels.copy()
    expected[idx] = (labels[idx] + rng.integers(1, 10, size=20)) % 10
    np.testing.assert_array_equal(a, expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fraction": 1.5}, ValueError, r"fraction must be in \[0, 1\].*1\.5"),
        ({"fraction": -0.1}, ValueError, r"fraction must be in \[0, 1\]"),
        ({"fraction": float("nan")}, ValueError, r"fraction must be in \[0, 1\]"),
        ({"fraction": "0.4"}, TypeError, "fraction must be a number"),
        ({"num_classes": 1}, ValueError, "num_classes must be >= 2"),
        ({"num_classes": 2.0}, TypeError, "num_classes must be an int"),
        ({"seed": -1}, ValueError, "seed must be a non-negative int"),
        ({"seed": 1.5}, TypeError, "seed must be a non-negative int"),
        ({"labels": np.array([0, 1, 10])}, ValueError, r"labels must lie in \[0, num_classes=10\)"),
        ({"labels": np.array([0, -1])}, ValueError, "labels must lie in"),
        ({"labels": np.zeros((2, 2), int)}, ValueError, "labels must be a 1-D array"),
        ({"labels": np.array([0.0, 1.0])}, TypeError, "labels must be integers"),
    ],
)
def test_label_noise_validates(kwargs, error, match):
    args = {"labels": np.array([0, 1, 2, 3]), "fraction": 0.4, "seed": 0, "num_classes": 10}
    args.update(kwargs)
    labels = args.pop("labels")
    with pytest.raises(error, match=match):
        data.label_noise(labels, **args)


def test_digits_split_is_fixed_and_disjoint():
    from sklearn.datasets import load_digits

    train, test, classes = data.load_digits()
    again_train, again_test, _ = data.load_digits()
    assert classes == 10 and len(train) == 1280 and len(test) == 517
    assert train.images.shape == (1280, 8, 8, 1) and train.images.dtype == np.uint8
    assert train.images.max() == 16 and train.images.min() == 0
    np.testing.assert_array_equal(train.images, again_train.images)
    np.testing.assert_array_equal(test.labels, again_test.labels)
    # Together the two splits are the 1,797 bundled images, each once, with its label.
    bunch = load_digits()
    flat = np.concatenate([train.images, test.images]).reshape(1797, 64)
    both = np.concatenate([train.labels, test.labels])
    order = np.lexsort(np.c_[flat, both].T)
    ref = np.c_[bunch.data.astype(np.uint8), bunch.target]
    np.testing.assert_array_equal(np.c_[flat, both][order], ref[np.lexsort(ref.T)])
    assert set(np.unique(test.labels)) == set(range(10))
    other, _, _ = data.load_digits(split_seed=1)
    assert not np.array_equal(other.labels, train.labels)


def test_digits_normalize_and_batches():
    train, _, _ = data.load_digits()
    x = data.normalize(train.images, "digits")
    expected = (train.images.astype(np.float64) / 16 - 0.30526) / 0.37605
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    first = list(data.batches(train, 128, dataset="digits", rng=data.epoch_rng(0, 0),
                              train=True, augment=False))
    assert [b[0].shape for b in first] == [(128, 8, 8, 1)] * 10
    # No augmentation: a shuffled permutation of the normalized images.
    order = data.epoch_rng(0, 0).permutation(len(train))
    np.testing.assert_array_equal(np.concatenate([b[0] for b in first]), x[order])


def test_training_data_noise_on_train_only_and_fit_metrics():
    config = SimpleNamespace(dataset="digits", limit_train=None, limit_test=None,
                             label_noise=0.4, noise_seed=3)
    d = data.load_training_data(config)
    assert d.flipped.sum() == 512 and d.train.labels.shape == (1280,)
    np.testing.assert_array_equal(d.train.labels != d.clean_labels, d.flipped)
    clean = data.load_training_data(SimpleNamespace(**{**vars(config), "label_noise": 0.0}))
    np.testing.assert_array_equal(clean.test.labels, d.test.labels)  # test labels clean
    np.testing.assert_array_equal(clean.train.labels, d.clean_labels)
    assert not clean.flipped.any()
    # A model predicting the clean labels everywhere: clean_fit 1, noisy_fit 0; one
    # predicting the noisy labels fits everything; a fixed mix in between.
    assert data.fit_metrics(d.clean_labels, d) == {"noisy_fit": 0.0, "clean_fit": 1.0}
    assert data.fit_metrics(d.train.labels, d) == {"noisy_fit": 1.0, "clean_fit": 1.0}
    pred = d.train.labels.copy()
    flipped_idx, kept_idx = np.flatnonzero(d.flipped), np.flatnonzero(~d.flipped)
    pred[flipped_idx[:128]] = d.clean_labels[flipped_idx[:128]]
    pred[kept_idx[:192]] = (pred[kept_idx[:192]] + 1) % 10
    assert data.fit_metrics(pred, d) == {"noisy_fit": 384 / 512, "clean_fit": 576 / 768}
    assert data.fit_metrics(clean.train.labels, clean)["noisy_fit"] is None
    with pytest.raises(ValueError, match="predictions must have shape"):
        data.fit_metrics(pred[:5], d)


def test_help_lists_the_optimizer_registry(capsys):
    from examples.optimizers import OPTAX_OPTIMIZERS, TORCH_OPTIMIZERS

    with pytest.raises(SystemExit):
        cli.build_parser("x").parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in set(TORCH_OPTIMIZERS) | set(OPTAX_OPTIMIZERS):
        assert name in text
    for flag in ("--label-noise", "--noise-seed", "--m-sharpness", "digits", "--no-augment"):
        assert flag in text


def test_flags_are_validated():
    with pytest.raises(SystemExit, match=r"--m-sharpness must divide --batch-size 128.*\[1, 2"):
        cli.parse_args("x", ["--m-sharpness", "24"])
    with pytest.raises(SystemExit, match="SAM-family"):
        cli.parse_args("x", ["--optimizer", "sgd", "--m-sharpness", "8"])
    with pytest.raises(SystemExit, match=r"--label-noise must be a fraction in \[0, 1\]"):
        cli.parse_args("x", ["--label-noise", "1.2"])
    args = cli.parse_args("x", ["--dataset", "digits", "--label-noise", "0.4",
                                "--m-sharpness", "16"])
    assert (args.dataset, args.label_noise, args.noise_seed, args.m_sharpness) == (
        "digits", 0.4, 0, 16)


def test_make_config_defaults_and_overrides():
    config = cli.make_config(dataset="digits", optimizer="asam", epochs=3)
    assert isinstance(config, argparse.Namespace)
    assert config.out is None and config.rho == 0.5 and config.epochs == 3
    assert config.lr == 0.1 and config.label_noise == 0.0
    with pytest.raises(TypeError, match=r"unknown arguments.*'epoch'"):
        cli.make_config(epoch=3)
    with pytest.raises(SystemExit, match="--epochs must be >= 1"):
        cli.make_config(epochs=0)


def test_check_chunks_names_the_last_batch():
    config = SimpleNamespace(m_sharpness=16, batch_size=128)
    cli.check_chunks(config, 1280)
    cli.check_chunks(config, 1296)  # last batch of 16
    with pytest.raises(ValueError, match="last batch of the 1300 training examples has 20"):
        cli.check_chunks(config, 1300)
