"""SAM under Lightning's automatic optimization: batch-norm statistics and mixed precision."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sam_torch
from sam_torch import SAM

pl = pytest.importorskip("lightning.pytorch")

STEPS = 4
BATCH = 8


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double()


def make_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH, 5, generator=g, dtype=torch.float64)
    return x, torch.randn(STEPS * BATCH, 2, generator=g, dtype=torch.float64)


def loss_fn(net, x, y):
    return ((net(x) - y) ** 2).mean()


class Module(pl.LightningModule):
    def __init__(self, pass_model: bool):
        super().__init__()
        self.net = make_net()
        self.pass_model = pass_model
        self.counts: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return loss_fn(self.net, x, y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.counts.append(int(self.net[1].num_batches_tracked))

    def configure_optimizers(self):
        return SAM(
            self.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.1,
            model=self if self.pass_model else None,
        )

    def train_dataloader(self):
        dataset = torch.utils.data.TensorDataset(*make_data())
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)


def fit(module: pl.LightningModule) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own advice (num_workers, ...)
        trainer.fit(module)
    return trainer


def two_step_reference() -> nn.Module:
    """The two-step API with the perturbed pass's statistics frozen by hand."""
    net = make_net()
    sam = SAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.1)
    x, y = make_data()
    for i in range(STEPS):
        xb, yb = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
        loss_fn(net, xb, yb).backward()
        sam.first_step(zero_grad=True)
        with sam_torch.disable_running_stats(net):
            loss_fn(net, xb, yb).backward()
        sam.second_step(zero_grad=True)
    return net


def test_trainer_counts_one_batch_norm_update_per_step_with_model_given():
    module = Module(pass_model=True)
    trainer = fit(module)
    assert trainer.global_step == STEPS
    assert module.counts == list(range(1, STEPS + 1))  # one per step
    expected = two_step_reference()
    got, ref = module.net.state_dict(), expected.state_dict()
    for k in ref:  # running mean/var of the clean passes, and the same weights
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=0, msg=k)
    assert all(m.track_running_stats for m in module.net.modules() if isinstance(m, nn.BatchNorm1d))


def test_trainer_without_model_updates_the_statistics_in_both_passes():
    # What model= is for: Lightning's closure runs both passes, each a batch-norm update.
    module = Module(pass_model=False)
    fit(module)
    assert module.counts == [2 * i for i in range(1, STEPS + 1)]
    ref = two_step_reference().state_dict()
    assert not torch.equal(module.net.state_dict()["1.running_mean"], ref["1.running_mean"])


def test_grad_scaler_step_without_closure_names_the_supported_path():
    # Lightning's precision="16-mixed" (CUDA only) runs the closure, then
    # scaler.step(optimizer) with no closure: SAM cannot make its second pass there.
    net = make_net().float()
    sam = SAM(net.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = make_data()
    scaler.scale(loss_fn(net, x[:BATCH].float(), y[:BATCH].float())).backward()
    w0 = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"GradScaler.step\(optimizer\).*sam_torch.ScaledSAM with manual optimization"):
        scaler.step(sam)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), w0, strict=True))
