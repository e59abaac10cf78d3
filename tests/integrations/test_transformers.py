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
        # fc1.bias feeds BatchNorm, so its gradient is zero in exact arithmetic: both sides
        # step it with AdamW's m / sqrt(v) of rounding noise, which magnifies the kernels'
        # different rounding (seen: 2e-12 at accumulation 2); 1e-9 is still far below lr.
        # The other tensors: float64 kernels sum in an order that depends on the CPU's
        # instruction set, and AdamW's normalized steps carry that into the weights and
        # BatchNorm's statistics (seen: 1e-9 relative on an Intel Xeon at accumulation 2,
        # 1e-12 on an AMD EPYC); a wrong step would differ by the order of lr (0.05).
        atol = 1e-9 if name == "fc1.bias" else 1e-10
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=1e-8, atol=atol)
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


# -- m-sharpness ----------------------------------------------------------------------------
def _functional_bnnet(p: dict[str, torch.Tensor], x: torch.Tensor, batch_norm: bool):
    """BNNet written out: Linear, BatchNorm in training mode (the batch's own mean and biased
    variance, eps 1e-5), tanh, Linear. Also returns the batch mean and unbiased variance."""
    h = x @ p["fc1.weight"].T + p["fc1.bias"]
    stats = None
    if batch_norm:
        mean, var = h.mean(0), h.var(0, unbiased=False)
        stats = (mean.detach(), h.var(0, unbiased=True).detach())
        h = (h - mean) / torch.sqrt(var + 1e-5) * p["bn.weight"] + p["bn.bias"]
    return torch.tanh(h) @ p["fc2.weight"].T + p["fc2.bias"], stats


@pytest.mark.parametrize(
    ("m", "accumulation", "batch_norm"), [(2, 1, True), (2, 2, True), (1, 2, False), (4, 1, True)]
)
def test_m_sharpness_matches_the_definition_in_float64(tmp_path, m, accumulation, batch_norm):
    """SAMTrainer(m_sharpness=m) against issue 18's definition written with plain autograd:
    each chunk c of m examples perturbed by e_c = rho g_c / ||g_c|| from its own gradient,
    the stepped gradient the mean over all chunks of the step (every micro-batch) of
    grad L_c(w + e_c), clipped, then SGD with the Trainer's linear schedule; BatchNorm
    running statistics updated once per micro-batch from the mean of the chunks' batch
    statistics; logged loss, grad_norm, sharpness and sam_grad_norm from the same figures."""
    model = BNNet(batch_norm).double()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    model.register_forward_pre_hook(
        lambda mod, a, kw: calls.append({k: v.clone() for k, v in kw.items()}), with_kwargs=True
    )
    lr, rho, clip, steps, batch = 0.05, 0.1, 0.3, 4, 4
    args = make_args(
        tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        learning_rate=lr, max_grad_norm=clip, lr_scheduler_type="linear", warmup_steps=1,
        optim="sgd", weight_decay=0.0,
    )
    trainer = SAMTrainer(
        model=model, args=args, train_dataset=VectorTask(), sam_rho=rho, m_sharpness=m
    )
    trainer.train()
    k = batch // m
    assert len(calls) == 2 * k * accumulation * steps  # a clean and a perturbed pass per chunk

    w = {n: t.clone().requires_grad_(True) for n, t in initial.items()}
    sgd = torch.optim.SGD(list(w.values()), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        sgd, lambda s: s / 1 if s < 1 else max(0.0, (steps - s) / (steps - 1))
    )
    running_mean, running_var = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    it = iter(calls)
    expected = []
    for _ in range(steps):
        total = {n: torch.zeros_like(t) for n, t in w.items()}
        clean_losses, perturbed_losses, norms = [], [], []
        for _ in range(accumulation):
            chunk_stats = []
            for _ in range(k):
                chunk, again = next(it), next(it)
                assert len(chunk["labels"]) == m
                assert all(torch.equal(chunk[key], again[key]) for key in chunk)
                logits, stats = _functional_bnnet(w, chunk["x"], batch_norm)
                loss = F.cross_entropy(logits, chunk["labels"])
                g = torch.autograd.grad(loss, list(w.values()))
                norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
                e = {n: rho * gi / (norm + 1e-12) for n, gi in zip(w, g, strict=True)}
                logits, _ = _functional_bnnet({n: w[n] + e[n] for n in w}, chunk["x"], batch_norm)
                ploss = F.cross_entropy(logits, chunk["labels"])
                for n, gp in zip(w, torch.autograd.grad(ploss, list(w.values())), strict=True):
                    total[n] += gp
                clean_losses.append(loss.item())
                perturbed_losses.append(ploss.item())
                norms.append(norm.item())
                chunk_stats.append(stats)
            if batch_norm:
                running_mean = 0.9 * running_mean + 0.1 * torch.stack([s[0] for s in chunk_stats]).mean(0)
                running_var = 0.9 * running_var + 0.1 * torch.stack([s[1] for s in chunk_stats]).mean(0)
        grads = {n: t / (k * accumulation) for n, t in total.items()}
        grad_norm = torch.sqrt(sum((t * t).sum() for t in grads.values())).item()
        coef = min(1.0, clip / (grad_norm + 1e-6))
        for n, t in w.items():
            t.grad = grads[n] * coef
        sgd.step()
        schedule.step()
        n_chunks = k * accumulation
        expected.append((
            sum(clean_losses) / n_chunks,
            grad_norm,
            (sum(perturbed_losses) - sum(clean_losses)) / n_chunks,
            sum(norms) / n_chunks,
        ))

    assert min(e[1] for e in expected) > clip  # clipping was active at every step
    # SGD, not Adam: under BatchNorm fc1.bias has a zero gradient in exact arithmetic, and
    # Adam's division by sqrt(v) would turn the two sides' different rounding noise into steps
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n].detach(), rtol=1e-12, atol=1e-12)
    if batch_norm:
        torch.testing.assert_close(model.bn.running_mean, running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.bn.running_var, running_var, rtol=1e-12, atol=1e-12)
        assert int(model.bn.num_batches_tracked) == steps * accumulation
    got = [(h["loss"], h["grad_norm"], h["sharpness"], h["sam_grad_norm"]) for h in train_logs(trainer)]
    assert len(got) == steps
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=1e-6, abs=1e-9)  # logged in float32


def test_m_sharpness_asam_equals_m_sharpness_step(tmp_path):
    """ASAM, m = 2, BatchNorm, float64: SAMTrainer's steps are sam_torch.m_sharpness_step's on
    the same batches (weights, running statistics, sharpness), both loop and vectorized."""
    model = BNNet().double()
    references = {v: copy.deepcopy(model) for v in (False, True)}
    calls = []
    model.register_forward_pre_hook(
        lambda mod, a, kw: calls.append({k: v.clone() for k, v in kw.items()}), with_kwargs=True
    )
    args = make_args(tmp_path, per_device_train_batch_size=4, learning_rate=0.2, optim="sgd",
                     max_grad_norm=0.0, lr_scheduler_type="constant")
    trainer = SAMTrainer(model=model, args=args, train_dataset=VectorTask(), sam_rho=0.5,
                         sam_adaptive=True, m_sharpness=2)
    trainer.train()

    def loss_fn(net, chunk):
        return net(**chunk)["loss"]

    for vectorize, reference in references.items():
        sam = sam_torch.SAM(reference.parameters(), torch.optim.SGD, lr=0.2, rho=0.5, adaptive=True)
        sharpness = []
        for step in range(4):
            chunks = calls[4 * step : 4 * step + 4 : 2]  # the clean pass of each chunk
            batch = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
            sam_torch.m_sharpness_step(sam, reference, loss_fn, batch, m=2, vectorize=vectorize)
            sharpness.append(sam.sharpness.item())
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, reference.state_dict()[name], rtol=1e-12, atol=1e-12)
        got = [h["sharpness"] for h in train_logs(trainer)]
        assert got == pytest.approx(sharpness, rel=1e-6, abs=1e-9)
    moved = (params(model)["fc1.weight"] - params(BNNet().double())["fc1.weight"]).abs().max()
    assert moved > 1e-2


def test_m_sharpness_equals_batch_sam_when_m_is_the_batch(tmp_path):
    # m = B: one chunk, perturbed from the batch's gradient, with the same dropout masks in
    # both passes: the step of SAMTrainer without m_sharpness (dropout on, AdamW, clipping).
    args = make_args(tmp_path, optim="adamw_torch", max_grad_norm=1.0)
    batch_model, m_model = tiny_bert(), tiny_bert()
    plain = SAMTrainer(model=batch_model, args=args, train_dataset=TokenTask(), sam_rho=0.05)
    plain.train()
    trainer = SAMTrainer(
        model=m_model, args=args, train_dataset=TokenTask(), sam_rho=0.05, m_sharpness=8
    )
    trainer.train()
    a, b = params(batch_model), params(m_model)
    assert all(torch.equal(a[n], b[n]) for n in a)  # same operations in the same order
    moved = max((a[n] - params(tiny_bert())[n]).abs().max().item() for n in a)
    assert moved > 1e-3
    for x, y in zip(train_logs(plain), train_logs(trainer), strict=True):
        for key in ("loss", "grad_norm", "sharpness", "sam_grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7)


def test_m_sharpness_differs_from_batch_sam_and_logs_sharpness(tmp_path):
    model = tiny_bert()
    forwards = count_forwards(model)
    masks = []
    model.bert.encoder.layer[0].output.dropout.register_forward_hook(
        lambda mod, i, o: masks.append((o == 0) & (i[0] != 0))
    )
    trainer = SAMTrainer(
        model=model, args=make_args(tmp_path), train_dataset=TokenTask(), sam_rho=0.05,
        m_sharpness=2,
    )
    trainer.train()
    assert forwards[0] == 4 * 4 * 2  # 4 steps x 4 chunks x (clean + perturbed)
    # same dropout masks in a chunk's two passes, other masks for the next chunk
    assert all(torch.equal(masks[i], masks[i + 1]) for i in range(0, len(masks), 2))
    assert not torch.equal(masks[0], masks[2])
    logs = train_logs(trainer)
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    for h in logs:
        assert math.isfinite(h["loss"]) and h["grad_norm"] > 0
        # first order, mean_c [L_c(w + e_c) - L_c(w)] = rho * mean_c ||g_c||
        assert h["sharpness"] == pytest.approx(0.05 * h["sam_grad_norm"], rel=0.3)
    assert not trainer.sam.is_perturbed

    batch_model = tiny_bert()
    batch = SAMTrainer(model=batch_model, args=make_args(tmp_path), train_dataset=TokenTask(),
                       sam_rho=0.05)
    batch.train()
    a, b = params(model), params(batch_model)
    assert max((a[n] - b[n]).abs().max().item() for n in a) > 1e-5
    # chunk gradients of 2 examples are larger than the batch's: their mean norm is too
    assert logs[0]["sam_grad_norm"] > train_logs(batch)[0]["sam_grad_norm"]


def test_m_sharpness_clear_errors(tmp_path):
    model = tiny_bert()
    args = make_args(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="m_sharpness must be"):
        SAMTrainer(model=model, args=args, m_sharpness=0)
    with pytest.raises(ValueError, match=r"per_device_train_batch_size: .*B=8 is not a multiple "
                                         r"of m=3.*\[1, 2, 4, 8\]"):
        SAMTrainer(model=model, args=args, m_sharpness=3)
    with pytest.raises(TypeError, match="does not support GSAM: its ascent gradient"):
        SAMTrainer(model=model, args=args, sam_class=sam_torch.GSAM, m_sharpness=2)
    looksam = sam_torch.LookSAM(model.parameters(), torch.optim.AdamW, lr=1e-3, k=2)
    with pytest.raises(TypeError, match="does not support LookSAM"):
        SAMTrainer(model=model, args=args, optimizers=(looksam, None), m_sharpness=2)

    # the last, incomplete batch of an epoch: 60 examples in batches of 8 leave 4
    before = params(model)
    epoch = make_args(tmp_path, max_steps=-1, num_train_epochs=1, logging_steps=100)
    trainer = SAMTrainer(
        model=model, args=epoch, train_dataset=TokenTask(n=60), sam_rho=0.05, m_sharpness=8
    )
    with pytest.raises(ValueError, match=r"B=4 is not a multiple of m=8.*dataloader_drop_last=True"):
        trainer.train()
    assert trainer.state.global_step == 7 and not trainer.sam.is_perturbed
    after_seven = params(model)
    assert any(not torch.equal(before[n], after_seven[n]) for n in before)
    drop = make_args(tmp_path, max_steps=-1, num_train_epochs=1, dataloader_drop_last=True)
    trainer = SAMTrainer(
        model=tiny_bert(), args=drop, train_dataset=TokenTask(n=60), sam_rho=0.05, m_sharpness=8
    )
    trainer.train()
    assert trainer.state.global_step == 7

    # a GradScaler (fp16): refused before the step touches anything
    trainer = SAMTrainer(model=model, args=args, train_dataset=TokenTask(), m_sharpness=4)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="does not support a GradScaler"):
        trainer.train()
    assert all(torch.equal(after_seven[n], p) for n, p in params(model).items())


def test_m_sharpness_with_bf16_autocast_on_cpu(tmp_path):
    model = tiny_bert()
    dtypes = []
    model.classifier.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
    trainer = SAMTrainer(
        model=model, args=make_args(tmp_path, bf16=True, max_steps=2), train_dataset=TokenTask(),
        sam_rho=0.05, m_sharpness=4,
    )
    trainer.train()
    assert dtypes == [torch.bfloat16] * 8  # 2 steps x 2 chunks x 2 passes, all under autocast
    logs = train_logs(trainer)
    assert all(math.isfinite(h["sharpness"]) and math.isfinite(h["grad_norm"]) for h in logs)


def test_m_sharpness_nonfinite_chunk_skips_the_step(tmp_path):
    """skip_nonfinite ("clean", the default): an inf perturbed loss in one chunk of step 2
    skips that step's base step; weights and BatchNorm statistics stay those after step 1."""
    model = BNNet().double()
    calls = [0]
    snapshots = {}

    def poison(module, inputs, output):
        calls[0] += 1
        if calls[0] == 4 + 4:  # 4 passes per step: step 2, its chunk 2, perturbed pass
            output["loss"] = output["loss"] * float("inf")
        return output

    class Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots[state.global_step] = copy.deepcopy(model.state_dict())

    model.register_forward_hook(poison)
    args = make_args(tmp_path, per_device_train_batch_size=4, max_steps=3, optim="sgd",
                     learning_rate=0.1)
    trainer = SAMTrainer(model=model, args=args, train_dataset=VectorTask(), sam_rho=0.1,
                         m_sharpness=2, callbacks=[Snapshot()])
    trainer.train()
    assert calls[0] == 12
    assert trainer.sam.step_skipped is False  # step 3 ran
    for name, value in snapshots[1].items():
        assert torch.equal(value, snapshots[2][name]), name
    assert not torch.equal(snapshots[2]["fc1.weight"], snapshots[3]["fc1.weight"])
    assert not math.isfinite(train_logs(trainer)[1]["sharpness"])
