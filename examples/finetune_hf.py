"""Fine-tune a small BERT (built from a config, nothing downloaded) with the Hugging Face
``Trainer``: AdamW against SAM (:class:`sam_torch.integrations.transformers.SAMTrainer`),
several seeds, test accuracy mean +- std.

The task is synthetic sentiment classification, so it runs offline in about a minute per
run on one CPU core: each sentence is 32 tokens over a vocabulary of 100; ten tokens are
"positive" words, ten "negative", the rest filler; the label says whether the sentence has
more positive than negative words. A given fraction of the *training* labels is flipped
(label noise, default 20%: memorizing it is what hurts test accuracy), the test labels are
clean.

    python examples/finetune_hf.py            # AdamW, SAM at rho 0.01 0.02 0.05; seeds 0 1 2
    python examples/finetune_hf.py --optimizers sam --rho 0.1 --seeds 0

Needs ``pip install -e ".[torch,hf]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

VOCAB = 100
WORD_RATE = 0.15
POSITIVE = tuple(range(10, 20))
NEGATIVE = tuple(range(20, 30))


def make_task(n: int, seed: int, *, length: int = 32, noise: float = 0.0) -> dict[str, np.ndarray]:
    """``n`` sentences of token ids and their labels (``noise``: fraction of labels flipped).

    Filler tokens are 30..99; each position holds a sentiment word with probability
    ``WORD_RATE``, positive or negative with equal odds; the label is 1 when the sentence
    has more positive than negative words. Ties are dropped and redrawn.
    """
    rng = np.random.default_rng(seed)
    ids = np.empty((0, length), dtype=np.int64)
    labels = np.empty(0, dtype=np.int64)
    while len(ids) < n:
        shape = (2 * n, length)
        filler = rng.integers(30, VOCAB, size=shape)
        is_word = rng.random(shape) < WORD_RATE
        positive = rng.random(shape) < 0.5
        words = np.where(positive, rng.choice(POSITIVE, size=shape), rng.choice(NEGATIVE, size=shape))
        score = (np.where(positive, 1, -1) * is_word).sum(axis=1)
        keep = score != 0
        ids = np.concatenate([ids, np.where(is_word, words, filler)[keep]])
        labels = np.concatenate([labels, (score[keep] > 0).astype(np.int64)])
    ids, labels = ids[:n], labels[:n]
    if noise:
        flip = rng.random(n) < noise
        labels = np.where(flip, 1 - labels, labels)
    return {"input_ids": ids, "labels": labels}


class Sentences(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, np.ndarray]) -> None:
        self.ids = torch.as_tensor(data["input_ids"])
        self.labels = torch.as_tensor(data["labels"])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def build_model(seed: int, hidden: int, layers: int) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def run(optimizer: str, seed: int, args: argparse.Namespace, rho: float = 0.05) -> dict[str, float]:
    """Train one model (``optimizer`` ``"adamw"``, ``"sam"`` or ``"asam"``, SAM's radius
    ``rho``) and return its test accuracy, training time and last logged sharpness."""
    from transformers import Trainer, TrainingArguments

    from sam_torch.integrations.transformers import SAMTrainer

    train = Sentences(make_task(args.train_size, seed=1000 + seed, noise=args.noise))
    test = Sentences(make_task(args.test_size, seed=2000))  # one clean test set for every run
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=256,
            num_train_epochs=args.epochs,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_ratio,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
            logging_steps=50,
            report_to="none",
            disable_tqdm=True,
        )
        common = dict(
            model=build_model(seed, args.hidden, args.layers),
            args=training_args,
            train_dataset=train,
            compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
        )
        if optimizer == "adamw":
            trainer = Trainer(**common)
        else:
            trainer = SAMTrainer(**common, sam_rho=rho, sam_adaptive=optimizer == "asam")
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        metrics = trainer.evaluate(test)
        sharpness = [h["sharpness"] for h in trainer.state.log_history if "sharpness" in h]
    return {
        "test_accuracy": metrics["eval_accuracy"],
        "train_seconds": seconds,
        "last_sharpness": sharpness[-1] if sharpness else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optimizers", nargs="+", default=["adamw", "sam"], choices=["adamw", "sam", "asam"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.2, help="fraction of training labels flipped")
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="warm-up, fraction of the steps")
    p.add_argument("--rho", type=float, nargs="+", default=[0.01, 0.02, 0.05],
                   help="SAM's radius; several values: one row each (ASAM: try 0.5)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="write every run's figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results: dict[str, list[dict[str, float]]] = {}
    for optimizer in args.optimizers:
        for rho in [None] if optimizer == "adamw" else args.rho:
            name = optimizer if rho is None else f"{optimizer} rho={rho:g}"
            for seed in args.seeds:
                r = run(optimizer, seed, args, rho=rho)
                results.setdefault(name, []).append({"seed": seed, **r})
                print(f"{name}, seed {seed}: test accuracy {r['test_accuracy']:.4f} "
                      f"({r['train_seconds']:.0f} s)", flush=True)
    print("\noptimizer        test accuracy (mean +- std over seeds)  seconds/run")
    for name, runs in results.items():
        acc = [100 * r["test_accuracy"] for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        secs = statistics.mean(r["train_seconds"] for r in runs)
        print(f"{name:15s}  {statistics.mean(acc):6.2f} +- {std:4.2f} %  (n={len(acc)})"
              f"                  {secs:6.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
