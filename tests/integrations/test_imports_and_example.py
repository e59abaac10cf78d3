"""``import sam_torch`` never loads the Hugging Face stack; the fine-tuning example's task and CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


def test_sam_torch_does_not_import_transformers_or_accelerate():
    pytest.importorskip("torch")
    code = (
        "import sys, sam_torch, sam_torch.integrations; "
        "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_example_task_labels_and_noise():
    from examples.finetune_hf import NEGATIVE, POSITIVE, make_task

    clean = make_task(4000, seed=5)
    ids, labels = clean["input_ids"], clean["labels"]
    score = np.isin(ids, POSITIVE).sum(1) - np.isin(ids, NEGATIVE).sum(1)
    assert (score != 0).all() and np.array_equal(labels, (score > 0).astype(np.int64))
    assert 0.45 < labels.mean() < 0.55
    noisy = make_task(4000, seed=5, noise=0.2)
    assert np.array_equal(noisy["input_ids"], ids)
    assert 0.18 < (noisy["labels"] != labels).mean() < 0.22


def test_example_runs_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from examples.finetune_hf import main

    out = tmp_path / "results.json"
    results = main([
        "--train-size", "64", "--test-size", "64", "--epochs", "1", "--seeds", "0",
        "--rho", "0.05", "--hidden", "32", "--layers", "1", "--out", str(out),
    ])
    assert sorted(results) == ["adamw", "sam rho=0.05"]
    for runs in results.values():
        assert 0.0 <= runs[0]["test_accuracy"] <= 1.0
    assert out.is_file()
