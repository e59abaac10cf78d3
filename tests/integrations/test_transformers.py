"""SAMTrainer: SAM inside the Hugging Face ``transformers.Trainer`` (tiny models, CPU, a few steps)."""

from __future__ import annotations

import copy
import functools
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

import sam_torch  # noqa: E402
from sam_torch.integrations.transformers import SAMTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# -- fixtures ----------------------------------------------------------------------------
class TokenTask(torch.utils.data.Dataset):
    """Sequences of 12 token ids; the label says whether the first token is in the upper half."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 50, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] > 27).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert(seed: int = 0, dropout: float = 0.1, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config).to(dtype)


def make_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=4,
        logging_steps=1,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    model.register_forward_hook(hook)
    return calls


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_logs(trainer: Trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


# -- the checks of the issue ----------------------------------------------------------------
def test_two_forward_passes_per_step_sharpness_logged_and_weights_differ_from_adamw(tmp_path):
    model = tiny_bert()
    forwards = count_forwards(model)
    trainer = SAMTrainer(model=model, args=make_args(tmp_path), train_dataset=TokenTask(), sam_rho=0.05)
    trainer.train()
    assert forwards[0] == 8  # 4 steps x (clean + perturbed)
    logs = train_logs(trainer)
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    for h in logs:
        assert math.isfinite(h["loss"]) and h["grad_norm"] > 0
        # First order, L(w + e) - L(w) = rho * ||g|| + O(rho^2): the logged sharpness is the
        # difference of the two losses of one sampled objective (same dropout masks).
        assert h["sharpness"] == pytest.approx(0.05 * h["sam_grad_norm"], rel=0.3)
    assert isinstance(trainer.sam, sam_torch.SAM)
    assert trainer.sam.param_groups[0]["rho"] == 0.05

    plain_model = tiny_bert()
    Trainer(model=plain_model, args=make_args(tmp_path), train_dataset=TokenTask()).train()
    sam_w, plain_w = params(model), params(plain_model)
    diff = max((sam_w[n] - plain_w[n]).abs().max().item() for n in sam_w)
    assert diff > 1e-5


@pytest.mark.parametrize("accumulation", [1, 2])
def test_rho_zero_with_same_dropout_masks_is_the_plain_trainer_bit_for_bit(tmp_path, accumulation):
    # With rho = 0 the perturbed pass runs at w itself; with the same dropout masks (replayed
    # per micro-batch) its gradient is the clean gradient exactly, so SAM's step is AdamW's.
    args = make_args(
        tmp_path, weight_decay=0.01, per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    sam_model, plain_model = tiny_bert(), tiny_bert()
    trainer = SAMTrainer(model=sam_model, args=args, train_dataset=TokenTask(), sam_rho=0.0)
    trainer.train()
    Trainer(model=plain_model, args=args, train_dataset=TokenTask()).train()
    sam_w, plain_w = params(sam_model), params(plain_model)
    assert all(torch.equal(sam_w[n], plain_w[n]) for n in sam_w)
    assert [h["sharpness"] for h in train_logs(trainer)] == [0.0] * 4
    # ... and the weight-decay groups are the Trainer's (no decay on biases and LayerNorm)
    decays = sorted(g["weight_decay"] for g in trainer.sam.param_groups)
    assert decays == [0.0, 0.01]


def test_fresh_dropout_masks_differ_in_the_perturbed_pass(tmp_path):
    model = tiny_bert()
    masks = []
    dropout = model.bert.encoder.layer[0].output.dropout
    dropout.register_forward_hook(lambda m, i, o: masks.append((o == 0) & (i[0] != 0)))
    trainer = SAMTrainer(
        model=model, args=make_args(tmp_path, max_steps=2), train_dataset=TokenTask(),
        sam_rho=0.0, sam_dropout="fresh",
    )
    trainer.train()
    assert len(masks) == 4
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[2], masks[3])
    assert any(h["sharpness"] != 0.0 for h in train_logs(trainer))  # dropout noise, rho = 0

    model = tiny_bert()
    masks.clear()
    model.bert.encoder.layer[0].output.dropout.register_forward_hook(
        lambda m, i, o: masks.append((o == 0) & (i[0] != 0))
    )
    SAMTrainer(
        model=model, args=make_args(tmp_path, max_steps=2), train_dataset=TokenTask(), sam_rho=0.05
    ).train()
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[2], masks[3])
    assert masks[0].any() and not torch.equal(masks[0], masks[2])


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    # Same process, same kernels, same inputs: the resumed run must be bit for bit the
    # uninterrupted one (weights, optimizer state, scheduler, dropout RNG, data order).
    args = make_args(tmp_path, save_strategy="steps", save_steps=2, lr_scheduler_type="linear")
    full_model = tiny_bert()
    full = SAMTrainer(model=full_model, args=args, train_dataset=TokenTask(), sam_rho=0.05)
    full.train()
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    assert os.path.isfile(os.path.join(checkpoint, "optimizer.pt"))

    resumed_model = tiny_bert(seed=1)  # other initial weights: the checkpoint must set them
    resumed = SAMTrainer(model=resumed_model, args=args, train_dataset=TokenTask(), sam_rho=0.05)
    resumed.train(resume_from_checkpoint=checkpoint)
    a, b = params(full_model), params(resumed_model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    sa, sb = full.sam.state_dict()["state"], resumed.sam.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    tail = [{k: h[k] for k in ("step", "loss", "sharpness", "learning_rate")} for h in train_logs(full)]
    again = [{k: h[k] for k in ("step", "loss", "sharpness", "learning_rate")} for h in train_logs(resumed)]
    assert again == tail  # steps 1-2 come from the checkpoint's state, 3-4 are recomputed


# -- against a manual SAM loop in float64 ---------------------------------------------------
class BNNet(nn.Module):
    """Linear, BatchNorm, tanh, Linear (seeded); returns the loss as a Trainer model does."""

    def __init__(self, batch_norm: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.fc2(torch.tanh(self.bn(self.fc1(x))))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class VectorTask(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).long() + (self.x[:, 2] > 1).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_matches_a_manual_sam_loop_in_float64(tmp_path, accumulation):
    """Weights, BatchNorm statistics and every logged figure equal a loop written from the
    SAM recipe (accumulation: clean pass over all micro-batches, one perturbation, perturbed
    pass over the same micro-batches; clipping of the perturbed-point gradient; linear
    warm-up/decay schedule), replayed on the micro-batches the Trainer fed the model.
    Float64, tolerance 1e-12: the two sides differ only in kernel choices (e.g. AdamW's)."""
    model = BNNet().double()
    reference = copy.deepcopy(model)
    calls = []
    model.register_forward_pre_hook(
        lambda m, a, kw: calls.append({k: v.clone() for k, v in kw.items()}), with_kwargs=True
    )
    lr, rho, clip, steps = 0.05, 0.1, 0.3, 4
    args = make_args(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        learning_rate=lr, max_grad_norm=clip, lr_scheduler_type="linear", warmup_steps=1,
        optim="adamw_torch", weight_decay=0.0,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=VectorTask(), sam_rho=rho)
    trainer.train()
    assert len(calls) == 2 * accumulation * steps

    sam = sam_torch.SAM(
        reference.parameters(), functools.partial(torch.optim.AdamW, weight_decay=0.0), lr=lr, rho=rho
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        sam, lambda s: s / 1 if s < 1 else max(0.0, (steps - s) / (steps - 1))
    )
    expected = []
    for step in range(steps):
        window = calls[2 * accumulation * step : 2 * accumulation * (step + 1)]
        clean_batches, perturbed_batches = window[:accumulation], window[accumulation:]
        for c, p in zip(clean_batches, perturbed_batches, strict=True):  # same micro-batches
            assert all(torch.equal(c[k], p[k]) for k in c)
        clean = 0.0
        for b in clean_batches:
            loss = reference(**b)["loss"] / accumulation
            loss.backward()
            clean += loss.item()
        sam.first_step(zero_grad=True)
        sam_norm = sam.grad_norm.item()
        perturbed = 0.0
        with sam_torch.disable_running_stats(reference):
            for b in clean_batches:
                loss = reference(**b)["loss"] / accumulation
                loss.backward()
                perturbed += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip).item()
        sam.second_step(zero_grad=True)
        schedule.step()
        expected.append((clean, norm, perturbed - clean, sam_norm))

    assert min(e[1] for e in expected) > clip  # clipping was active at every step
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=1e-12, atol=1e-12)
    assert int(model.bn.num_batches_tracked) == steps * accumulation  # clean passes only
    logs = train_logs(trainer)
    got = [(h["loss"], h["grad_norm"], h["sharpness"], h["sam_grad_norm"]) for h in logs]
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=1e-6, abs=1e-9)  # logged in float32


def test_gradient_accumulation_is_one_sam_step_on_the_whole_batch(tmp_path):
    """4 micro-batches of 2 give the weights of one batch of 8 (no BatchNorm, SGD, float64):
    the perturbation comes from the gradient of all 4, not from each micro-batch's."""
    models = {}
    for accumulation, batch in ((1, 8), (4, 2)):
        models[accumulation] = BNNet(batch_norm=False).double()
        SAMTrainer(
            model=models[accumulation],
            args=make_args(tmp_path, per_device_train_batch_size=batch, learning_rate=0.5,
                           gradient_accumulation_steps=accumulation, max_steps=3, optim="sgd"),
            train_dataset=VectorTask(),
            sam_rho=0.5,
        ).train()
    a, b = params(models[1]), params(models[4])
    initial = params(BNNet(batch_norm=False).double())
    moved = max((a[n] - initial[n]).abs().max().item() for n in a)
    assert moved > 0.05
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-12)


# -- optimizer choice, variants, precision -------------------------------------------------
def test_user_sam_instance_and_clear_errors(tmp_path):
    model = tiny_bert()
    forwards = count_forwards(model)
    sam = sam_torch.SAM(model.parameters(), torch.optim.AdamW, lr=1e-3, rho=0.05)
    args = make_args(tmp_path, max_steps=2, lr_scheduler_type="linear")
    trainer = SAMTrainer(model=model, args=args, train_dataset=TokenTask(), optimizers=(sam, None))
    trainer.train()
    assert forwards[0] == 4 and trainer.sam is sam
    assert sam.param_groups[0]["lr"] == trainer.lr_scheduler.get_last_lr()[0] == 0.0
    assert "sharpness" in train_logs(trainer)[-1]

    with pytest.raises(TypeError, match=r"SAMTrainer needs a sam_torch\.SAM optimizer, got AdamW"):
        SAMTrainer(model=model, args=args, optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(ValueError, match="sam_rho only apply when the Trainer builds the optimizer"):
        SAMTrainer(model=model, args=args, optimizers=(sam, None), sam_rho=0.1)
    with pytest.raises(ValueError, match="sam_dropout must be 'same' or 'fresh', got 'new'"):
        SAMTrainer(model=model, args=args, sam_dropout="new")
    with pytest.raises(ValueError, match=r"sam_rho/sam_adaptive: rho must be .*-0\.1"):
        SAMTrainer(model=model, args=args, sam_rho=-0.1)
    with pytest.raises(ValueError, match="pass it as sam_rho= instead"):
        SAMTrainer(model=model, args=args, sam_kwargs={"rho": 0.1})


@pytest.mark.parametrize(
    ("sam_class", "sam_kwargs", "forwards"),
    [
        (sam_torch.GSAM, {"alpha": 0.2}, 8),
        (sam_torch.LookSAM, {"k": 2}, 6),  # full, reuse, full, reuse
        (sam_torch.EveryKSAM, {"k": 2}, 6),  # plain, SAM, plain, SAM
        (sam_torch.MomentumSAM, {}, 4),  # one pass, at w + e
    ],
)
def test_variants(tmp_path, sam_class, sam_kwargs, forwards):
    model = tiny_bert()
    calls = count_forwards(model)
    trainer = SAMTrainer(
        model=model, args=make_args(tmp_path, optim="adamw_torch"), train_dataset=TokenTask(),
        sam_class=sam_class, sam_rho=0.05, sam_kwargs=sam_kwargs,
    )
    trainer.train()
    assert type(trainer.sam) is sam_class
    assert calls[0] == forwards
    assert all(math.isfinite(h["loss"]) for h in train_logs(trainer))
    assert not trainer.sam.is_perturbed


def test_bf16_autocast_on_cpu(tmp_path):
    model = tiny_bert()
    dtypes = []
    model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer = SAMTrainer(
        model=model, args=make_args(tmp_path, bf16=True, max_steps=2), train_dataset=TokenTask(),
        sam_rho=0.05,
    )
    trainer.train()
    assert dtypes == [torch.bfloat16] * 4  # both passes under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    logs = train_logs(trainer)
    assert all(math.isfinite(h["sharpness"]) and math.isfinite(h["grad_norm"]) for h in logs)


def test_grad_scaler_path_on_cpu(tmp_path):
    """The fp16 path: Accelerate creates a GradScaler only on CUDA, so a CPU GradScaler is
    put in its place (no autocast; the scaling is what is tested). Scaling by a power of two
    and unscaling is exact, so the weights equal the unscaled run bit for bit; an inf in the
    perturbed pass makes scaler.step() skip the step, with w restored before anything reads it.
    No clipping here: Accelerate's clip_grad_norm_ unscales only when it made the scaler
    itself (CUDA fp16), so on CPU it would clip the scaled gradient."""
    args = make_args(tmp_path, max_steps=3, optim="adamw_torch", max_grad_norm=0.0)
    plain_model, scaled_model = tiny_bert(), tiny_bert()
    SAMTrainer(model=plain_model, args=args, train_dataset=TokenTask(), sam_rho=0.05).train()
    trainer = SAMTrainer(model=scaled_model, args=args, train_dataset=TokenTask(), sam_rho=0.05)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    trainer.train()
    a, b = params(plain_model), params(scaled_model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert trainer.accelerator.scaler.get_scale() == 2.0**10  # no inf: no back-off

    model = tiny_bert()
    calls = [0]
    after_step = {}

    def poison(module, inputs, output):  # the perturbed pass of step 2 returns an inf loss
        calls[0] += 1
        if calls[0] == 4:
            output.loss = output.loss * float("inf")
        return output

    class Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            after_step[state.global_step] = (params(model), trainer.sam.is_perturbed)

    model.register_forward_hook(poison)
    trainer = SAMTrainer(
        model=model, args=args, train_dataset=TokenTask(), sam_rho=0.05, callbacks=[Snapshot()]
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    trainer.train()
    w1, w2 = after_step[1][0], after_step[2][0]
    assert all(torch.equal(w1[n], w2[n]) for n in w1)  # step 2 skipped, w restored exactly
    assert not after_step[2][1]
    assert not all(torch.equal(w2[n], after_step[3][0][n]) for n in w2)  # step 3 ran
    assert trainer.accelerator.scaler.get_scale() == 2.0**9  # one back-off
