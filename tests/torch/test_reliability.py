"""sam_torch reliability: AMP (GradScaler, autocast), schedulers, zero_grad, accumulation,
torch.compile, a Lightning-style closure loop, faults between the passes, exact resume and
the non-finite gradient policy.

Every expectation is either an independent reference (plain SAM, a float64 NumPy formula,
an uninterrupted run) or the exact previous weights.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sam_torch
from sam_torch import SAM, ScaledSAM
from tests import reference as ref

torch.use_deterministic_algorithms(True)


# -- helpers -------------------------------------------------------------------------------
def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_data(n_steps: int, seed: int = 1, n: int = 12, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype))
        for _ in range(n_steps)
    ]


def mse(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((model(x) - t) ** 2).mean()


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y), (x - y).abs().max()


def opt_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for p in (q for g in opt.param_groups for q in g["params"]):
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor):
                out.append(v.detach().clone())
    return out


def plain_sam_run(model, opt, data, clip: float | None = None):
    """Reference loop: SAM's two-step API without any scaler."""
    for x, t in data:
        mse(model, x, t).backward()
        opt.first_step(zero_grad=True)
        mse(model, x, t).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True)


# -- GradScaler ----------------------------------------------------------------------------
@pytest.mark.parametrize(("api", "clip"), [("two_step", None), ("two_step", 0.05), ("closure", None)])
def test_grad_scaler_gives_the_unscaled_trajectory_bit_for_bit(api, clip):
    # Power-of-two scales multiply and divide exactly, so a correct recipe (each pass scaled
    # and unscaled once, clipping on unscaled gradients) reproduces plain SAM bit for bit.
    data = make_data(4)
    ref_model = make_model()
    plain_sam_run(ref_model, SAM(ref_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9), data, clip)

    model = make_model()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    amp = ScaledSAM(sam, scaler)
    for x, t in data:
        if api == "two_step":
            amp.scale(mse(model, x, t)).backward()
            amp.first_step(zero_grad=True)
            amp.scale(mse(model, x, t)).backward()
            if clip is not None:
                amp.unscale_()
                amp.unscale_()  # a second call in the same pass is harmless
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            amp.second_step(zero_grad=True)
        else:

            def closure(x=x, t=t):
                sam.zero_grad()
                loss = mse(model, x, t)
                amp.scale(loss).backward()
                return loss

            loss = amp.step(closure)
            assert loss.dtype == torch.float64 and sam.perturbed_loss is not None
    assert_bitwise(snapshot(model), snapshot(ref_model))
    # growth_interval=1 counts passes: two growths per step, eight after four clean steps
    assert scaler.get_scale() == 2.0**12 * 2.0**8
    assert not sam.step_skipped


def test_grad_scaler_closure_api_with_clipping_matches_plain_sam():
    data = make_data(3, seed=5)
    ref_model = make_model(seed=2)
    plain_sam_run(ref_model, SAM(ref_model.parameters(), torch.optim.SGD, lr=0.2), data, clip=0.01)
    model = make_model(seed=2)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.2)
    amp = ScaledSAM(sam, torch.amp.GradScaler("cpu", init_scale=2.0**8))
    for x, t in data:
        calls = []

        def closure(x=x, t=t, calls=calls):
            sam.zero_grad()
            loss = mse(model, x, t)
            amp.scale(loss).backward()
            calls.append(1)
            if len(calls) == 2:  # clip the perturbed gradient between unscale and step
                amp.unscale_()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            return loss

        amp.step(closure)
    assert_bitwise(snapshot(model), snapshot(ref_model))


def _poisoned_loss(model, x, t, poison: bool):
    loss = mse(model, x, t)
    return loss * torch.tensor(float("inf"), dtype=loss.dtype) if poison else loss


@pytest.mark.parametrize("bad_pass", [1, 2])
@pytest.mark.parametrize("skip_nonfinite", ["clean", "both", False])
def test_grad_scaler_skips_a_step_with_inf_in_either_pass(bad_pass, skip_nonfinite):
    data = make_data(3, seed=7)
    model = make_model(seed=3)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, skip_nonfinite=skip_nonfinite)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000, backoff_factor=0.5)
    amp = ScaledSAM(sam, scaler)
    sched = torch.optim.lr_scheduler.LambdaLR(sam, lambda k: 1.0 / (k + 1))
    x, t = data[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unscale twice", no scheduler-order warning
        amp.scale(mse(model, x, t)).backward()  # one good step builds momentum state
        amp.first_step(zero_grad=True)
        amp.scale(mse(model, x, t)).backward()
        amp.second_step(zero_grad=True)
        sched.step()
        w_before, state_before = snapshot(model), opt_state(sam)
        scale_before = scaler.get_scale()

        x, t = data[1]
        amp.scale(_poisoned_loss(model, x, t, bad_pass == 1)).backward()
        amp.first_step(zero_grad=True)
        if bad_pass == 1:
            assert_bitwise(snapshot(model), w_before)  # nothing was perturbed
        amp.scale(_poisoned_loss(model, x, t, bad_pass == 2)).backward()
        amp.second_step(zero_grad=True)
        sched.step()
    assert sam.step_skipped and not sam.is_perturbed
    assert_bitwise(snapshot(model), w_before)
    assert_bitwise(opt_state(sam), state_before)
    assert scaler.get_scale() == scale_before * 0.5  # backed off once
    assert all(p.grad is None for p in model.parameters())

    # and training goes on, equal to a run that never saw the bad batch
    ref_model = make_model(seed=3)
    ref_sam = SAM(ref_model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_sam, lambda k: 1.0 / (k + 1))
    plain_sam_run(ref_model, ref_sam, data[:1])
    ref_sched.step()
    ref_sched.step()
    plain_sam_run(ref_model, ref_sam, data[2:])
    x, t = data[2]
    amp.scale(mse(model, x, t)).backward()
    amp.first_step(zero_grad=True)
    amp.scale(mse(model, x, t)).backward()
    amp.second_step(zero_grad=True)
    assert not sam.step_skipped
    assert_bitwise(snapshot(model), snapshot(ref_model))


def test_grad_scaler_closure_skips_the_second_pass_after_inf_in_the_first():
    model = make_model(seed=4)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    amp = ScaledSAM(sam, scaler)
    x, t = make_data(1)[0]
    w0 = snapshot(model)
    calls = []

    def closure():
        sam.zero_grad()
        calls.append(1)
        loss = _poisoned_loss(model, x, t, True)
        amp.scale(loss).backward()
        return loss

    loss = amp.step(closure)
    assert len(calls) == 1 and sam.step_skipped and torch.isinf(loss)
    assert_bitwise(snapshot(model), w0)
    assert scaler.get_scale() == 2.0


def test_scaled_sam_float16_autocast_step_is_close_to_float32_sam():
    data = make_data(2, dtype=torch.float32)
    ref_model = make_model(seed=6, dtype=torch.float32)
    plain_sam_run(ref_model, SAM(ref_model.parameters(), torch.optim.SGD, lr=0.1), data)
    model = make_model(seed=6, dtype=torch.float32)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    amp = ScaledSAM(sam, torch.amp.GradScaler("cpu", init_scale=2.0**14))
    for x, t in data:
        for step in (amp.first_step, amp.second_step):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = mse(model, x, t)
            assert loss.dtype == torch.float32  # mse_loss autocasts to float32
            amp.scale(loss).backward()
            step(zero_grad=True)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0, atol=5e-3)
    assert not sam.step_skipped


def test_scaled_sam_rejects_wrong_arguments():
    p = nn.Parameter(torch.randn(2))
    with pytest.raises(TypeError, match=r"optimizer must be a sam_torch\.SAM, got SGD"):
        ScaledSAM(torch.optim.SGD([p], lr=0.1), torch.amp.GradScaler("cpu"))
    sam = SAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=r"scaler must be a torch\.amp\.GradScaler"):
        ScaledSAM(sam, None)
    amp = ScaledSAM(sam, torch.amp.GradScaler("cpu"))
    with pytest.raises(RuntimeError, match="without first_step"):
        amp.second_step()
    amp.scale((p * p).sum()).backward()
    amp.first_step()
    w = p.detach().clone()
    with pytest.raises(RuntimeError, match="called twice"):
        amp.first_step()
    assert torch.equal(p.detach(), w)
    amp.second_step()  # the scaler was left usable: no "unscale_() has already been called"


# -- bfloat16 autocast ---------------------------------------------------------------------
def test_bfloat16_autocast_perturbation_follows_the_float64_formula():
    model = make_model(seed=8, dtype=torch.float32)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.1)
    x, t = make_data(1, dtype=torch.float32)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    ((out.float() - t) ** 2).mean().backward()
    w = [p.detach().double().numpy().copy() for p in model.parameters()]
    g = [p.grad.double().numpy().copy() for p in model.parameters()]
    sam.first_step(zero_grad=True)
    e_expected = ref.sam_perturbation(w, g, rho=0.1)
    for p, w0, e in zip(model.parameters(), w, e_expected, strict=True):
        np.testing.assert_allclose(p.detach().double().numpy() - w0, e, rtol=1e-4, atol=1e-8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ((model(x).float() - t) ** 2).mean().backward()
    sam.second_step(zero_grad=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- schedulers, zero_grad, accumulation ---------------------------------------------------
def test_schedulers_with_closure_api_and_skipped_steps_do_not_warn():
    model = make_model(seed=9)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=1.0, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(sam, max_lr=0.5, total_steps=5)
    x, t = make_data(1)[0]
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(4):
            def closure(k=k):
                sam.zero_grad()
                loss = _poisoned_loss(model, x, t, k == 1)
                loss.backward()
                return loss

            sam.step(closure)
            assert sam.step_skipped == (k == 1)
            lrs.append(sam.base_optimizer.param_groups[0]["lr"])
            sched.step()
    expected = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9), max_lr=0.5, total_steps=5
    )
    ref_lrs = []
    for _ in range(4):
        ref_lrs.append(expected.optimizer.param_groups[0]["lr"])
        expected.optimizer.step()
        expected.step()
    assert lrs == ref_lrs


def test_zero_grad_set_to_none_false_gives_the_same_trajectory():
    data = make_data(3, seed=10)
    runs = []
    for set_to_none in (True, False):
        model = make_model(seed=11)
        sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, adaptive=True)
        for x, t in data:
            def closure(x=x, t=t, set_to_none=set_to_none, model=model, sam=sam):
                sam.zero_grad(set_to_none=set_to_none)
                loss = mse(model, x, t)
                loss.backward()
                return loss

            sam.step(closure)
            grads = [p.grad for p in model.parameters()]
            assert all(g is not None for g in grads)  # the closure's last backward left them
        sam.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            assert all(p.grad is None for p in model.parameters())
        else:
            assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
        runs.append(snapshot(model))
    assert_bitwise(runs[0], runs[1])


def test_gradient_accumulation_recipe_equals_the_full_batch_step():
    x_full, t_full = make_data(1, seed=12, n=12)[0]
    micro = [(x_full[i : i + 4], t_full[i : i + 4]) for i in range(0, 12, 4)]
    k = len(micro)
    full = make_model(seed=13)
    sam_full = SAM(full.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.2)
    accum = make_model(seed=13)
    sam_acc = SAM(accum.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.2)
    naive = make_model(seed=13)
    sam_naive = SAM(naive.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.2)
    for _ in range(3):
        plain_sam_run(full, sam_full, [(x_full, t_full)])
        for x, t in micro:  # the clean gradient over every micro-batch ...
            (mse(accum, x, t) / k).backward()
        sam_acc.first_step(zero_grad=True)  # ... perturbs once ...
        for x, t in micro:  # ... and the perturbed gradient over the same micro-batches
            (mse(accum, x, t) / k).backward()
        sam_acc.second_step(zero_grad=True)
        for x, t in micro:  # perturbing per micro-batch is a different algorithm
            (mse(naive, x, t) / k).backward()
            sam_naive.first_step(zero_grad=True)
            (mse(naive, x, t) / k).backward()
            sam_naive.restore()
        sam_naive.base_optimizer.step()
        sam_naive.zero_grad()
    for a, b in zip(accum.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert max((c - b).abs().max().item() for b, c in zip(full.parameters(), naive.parameters(), strict=True)) > 1e-6


# -- torch.compile -------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["swap", "copy"])
def test_compiled_model_sees_the_perturbed_weights(storage):
    # aot_eager traces through AOTAutograd (what inductor compiles) without a C++ build,
    # which keeps the test in seconds on a CPU runner.
    torch._dynamo.reset()
    data = make_data(3, seed=14, dtype=torch.float32)
    eager = make_model(seed=15, dtype=torch.float32)
    model = make_model(seed=15, dtype=torch.float32)
    compiled = torch.compile(model, backend="aot_eager")
    opts = [
        SAM(eager.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, storage=storage),
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, storage=storage),
    ]
    for x, t in data:
        for m, opt in zip((eager, compiled), opts, strict=True):
            def closure(m=m, opt=opt, x=x, t=t):
                opt.zero_grad()
                loss = mse(m, x, t)
                loss.backward()
                return loss

            opt.step(closure)
        torch.testing.assert_close(opts[1].perturbed_loss, opts[0].perturbed_loss, rtol=1e-6, atol=0)
        assert opts[1].sharpness != 0
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- Lightning -----------------------------------------------------------------------------
def _lightning_style_fit(model, sam, data):
    """Lightning's automatic optimization: the closure runs training_step, zero_grad and
    backward, and the loop only calls ``optimizer.step(closure=closure)``."""
    for x, t in data:
        def closure(x=x, t=t):
            loss = mse(model, x, t)
            sam.zero_grad()
            loss.backward()
            return loss

        sam.step(closure=closure)


def test_lightning_closure_protocol_loop_matches_two_step_api():
    data = make_data(4, seed=16)
    a, b = make_model(seed=17), make_model(seed=17)
    _lightning_style_fit(a, SAM(a.parameters(), torch.optim.AdamW, lr=1e-2), data)
    plain_sam_run(b, SAM(b.parameters(), torch.optim.AdamW, lr=1e-2), data)
    assert_bitwise(snapshot(a), snapshot(b))


def test_lightning_trainer_automatic_optimization():
    pl = pytest.importorskip("lightning.pytorch")
    data = make_data(3, seed=18, dtype=torch.float32)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model(seed=19, dtype=torch.float32)

        def training_step(self, batch, batch_idx):
            x, t = batch
            return mse(self.net, x, t)

        def configure_optimizers(self):
            return SAM(self.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.1)

        def train_dataloader(self):
            xs, ts = torch.cat([x for x, _ in data]), torch.cat([t for _, t in data])
            dataset = torch.utils.data.TensorDataset(xs, ts)
            return torch.utils.data.DataLoader(dataset, batch_size=len(data[0][0]), shuffle=False)

    module = Module()
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own advice (num_workers, ...)
        trainer.fit(module)
    expected = make_model(seed=19, dtype=torch.float32)  # the two-step API, no closure
    plain_sam_run(expected, SAM(expected.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.1), data)
    assert trainer.global_step == 3
    assert_bitwise(snapshot(module.net), snapshot(expected))


# -- faults between the passes -------------------------------------------------------------
class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize(
    "error",
    [_Boom("closure failed"), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), KeyboardInterrupt()],
    ids=["closure", "oom", "keyboard_interrupt"],
)
@pytest.mark.parametrize("storage", ["swap", "copy"])
def test_exception_in_the_perturbed_pass_restores_the_weights(error, storage):
    data = make_data(2, seed=20)
    model = make_model(seed=21)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, adaptive=True, storage=storage)
    plain_sam_run(model, sam, data[:1])
    w0, s0, calls = snapshot(model), opt_state(sam), []
    x, t = data[1]

    def closure():
        calls.append(1)
        sam.zero_grad()
        loss = mse(model, x, t)
        loss.backward()
        if len(calls) == 2:
            raise error
        return loss

    with pytest.raises(type(error)):
        sam.step(closure)
    assert not sam.is_perturbed
    assert_bitwise(snapshot(model), w0)
    assert_bitwise(opt_state(sam), s0)
    sam.state_dict()  # usable again
    # and the context manager, with the same three faults
    mse(model, x, t).backward()
    with pytest.raises(type(error)), sam.perturbed():
        mse(model, x, t).backward()
        raise error
    assert not sam.is_perturbed
    assert_bitwise(snapshot(model), w0)
    assert_bitwise(opt_state(sam), s0)


def test_perturbed_context_manager_equals_the_two_step_api():
    data = make_data(3, seed=22)
    a, b = make_model(seed=23), make_model(seed=23)
    sam_a = SAM(a.parameters(), torch.optim.AdamW, lr=1e-2, adaptive=True)
    sam_b = SAM(b.parameters(), torch.optim.AdamW, lr=1e-2, adaptive=True)
    for x, t in data:
        mse(a, x, t).backward()
        with sam_a.perturbed():
            assert sam_a.is_perturbed
            mse(a, x, t).backward()
        assert not sam_a.is_perturbed
        assert all(p.grad is None for p in a.parameters())
    plain_sam_run(b, sam_b, data)
    assert_bitwise(snapshot(a), snapshot(b))
    # second_step() inside the block: the exit adds nothing
    x, t = data[0]
    mse(a, x, t).backward()
    with sam_a.perturbed():
        mse(a, x, t).backward()
        sam_a.second_step(zero_grad=True)
    mse(b, x, t).backward()
    sam_b.first_step(zero_grad=True)
    mse(b, x, t).backward()
    sam_b.second_step(zero_grad=True)
    assert_bitwise(snapshot(a), snapshot(b))


@pytest.mark.parametrize("storage", ["swap", "copy"])
def test_failure_half_way_through_first_step_restores_the_weights(storage, monkeypatch):
    model = make_model(seed=24)
    params = list(model.parameters())
    sam = SAM(
        [{"params": params[:2]}, {"params": params[2:], "rho": 0.5}], torch.optim.SGD, lr=0.1,
        storage=storage,
    )
    x, t = make_data(1)[0]
    mse(model, x, t).backward()
    w0 = snapshot(model)
    real = sam_torch._sam.sam_core.apply_perturbation
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first group is already installed at w + e
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(sam_torch._sam.sam_core, "apply_perturbation", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        sam.first_step()
    assert len(calls) == 2 and not sam.is_perturbed
    assert_bitwise(snapshot(model), w0)
    monkeypatch.setattr(sam_torch._sam.sam_core, "apply_perturbation", real)
    sam.first_step()  # works again
    assert sam.is_perturbed


def test_state_dict_between_the_passes_raises_and_restore_recovers_the_model():
    model = make_model(seed=25)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, t = make_data(1)[0]
    w0 = snapshot(model)
    mse(model, x, t).backward()
    sam.first_step(zero_grad=True)
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), w0, strict=True))
    for call in (sam.state_dict, lambda: sam.load_state_dict({}), lambda: torch.save(sam.state_dict(), io.BytesIO())):
        with pytest.raises(RuntimeError, match="between first_step\\(\\) and second_step\\(\\)"):
            call()
    sam.restore()
    assert_bitwise(snapshot(model), w0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sam.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    assert_bitwise(list(saved["model"].values()), w0)


# -- exact resume --------------------------------------------------------------------------
def _train(model, sam, data, api):
    if api == "two_step":
        plain_sam_run(model, sam, data)
        return
    for x, t in data:
        def closure(x=x, t=t):
            sam.zero_grad()
            loss = mse(model, x, t)
            loss.backward()
            return loss

        sam.step(closure)


@pytest.mark.parametrize("api", ["two_step", "closure"])
@pytest.mark.parametrize(
    ("base", "kwargs"),
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    ],
    ids=["sgd_momentum", "adamw"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interrupted_and_resumed_training_is_bit_identical(api, base, kwargs, dtype):
    data = make_data(6, seed=26, dtype=dtype)
    cfg = dict(rho=0.1, adaptive=True, **kwargs)
    straight = make_model(seed=27, dtype=dtype)
    sam = SAM(straight.parameters(), base, **cfg)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=2, gamma=0.5)
    for batch in data:
        _train(straight, sam, [batch], api)
        sched.step()

    first = make_model(seed=27, dtype=dtype)
    sam1 = SAM(first.parameters(), base, **cfg)
    sched1 = torch.optim.lr_scheduler.StepLR(sam1, step_size=2, gamma=0.5)
    for batch in data[:3]:
        _train(first, sam1, [batch], api)
        sched1.step()
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": sam1.state_dict(), "sched": sched1.state_dict()}, buf)
    del first, sam1, sched1

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = make_model(seed=99, dtype=dtype)  # different init: everything must come from ckpt
    resumed.load_state_dict(ckpt["model"])
    sam2 = SAM(resumed.parameters(), base, **{**cfg, "rho": 0.7})  # rho too comes from ckpt
    sched2 = torch.optim.lr_scheduler.StepLR(sam2, step_size=2, gamma=0.5)
    sam2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sam2.param_groups[0]["rho"] == 0.1
    for batch in data[3:]:
        _train(resumed, sam2, [batch], api)
        sched2.step()
    assert_bitwise(snapshot(resumed), snapshot(straight))
    assert_bitwise(opt_state(sam2), opt_state(sam))


def test_resume_with_grad_scaler_state_is_bit_identical():
    data = make_data(4, seed=28, dtype=torch.float32)

    def run(model, amp, batches):
        for x, t in batches:
            amp.scale(_poisoned_loss(model, x, t, x[0, 0] > 1.4)).backward()  # some inf steps
            amp.first_step(zero_grad=True)
            amp.scale(mse(model, x, t)).backward()
            amp.second_step(zero_grad=True)

    def build(seed):
        model = make_model(seed=seed, dtype=torch.float32)
        sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        return model, ScaledSAM(sam, torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=3))

    straight, amp = build(29)
    run(straight, amp, data)
    first, amp1 = build(29)
    run(first, amp1, data[:2])
    ckpt = {"m": first.state_dict(), "o": amp1.optimizer.state_dict(), "s": amp1.scaler.state_dict()}
    resumed, amp2 = build(30)
    resumed.load_state_dict(ckpt["m"])
    amp2.optimizer.load_state_dict(ckpt["o"])
    amp2.scaler.load_state_dict(ckpt["s"])
    run(resumed, amp2, data[2:])
    assert_bitwise(snapshot(resumed), snapshot(straight))
    assert amp2.scaler.get_scale() == amp.scaler.get_scale()


# -- non-finite gradients ------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("adaptive", [False, True])
def test_nonfinite_clean_gradient_skips_the_step_by_default(bad, adaptive):
    model = make_model(seed=31)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, adaptive=adaptive)
    data = make_data(2, seed=32)
    plain_sam_run(model, sam, data[:1])
    w0, s0 = snapshot(model), opt_state(sam)
    x, t = data[1]
    mse(model, x, t).backward()
    next(iter(model.parameters())).grad[0, 1] = bad
    sam.first_step(zero_grad=True)
    assert sam.is_perturbed and sam.step_skipped
    assert_bitwise(snapshot(model), w0)  # not perturbed
    mse(model, x, t).backward()
    sam.second_step(zero_grad=True)
    assert sam.step_skipped and not sam.is_perturbed
    assert_bitwise(snapshot(model), w0)
    assert_bitwise(opt_state(sam), s0)
    # the closure API does not even evaluate the second pass
    calls = []

    def closure():
        calls.append(1)
        sam.zero_grad()
        mse(model, x, t).backward()
        next(iter(model.parameters())).grad[0, 0] = bad
        return None

    assert sam.step(closure) is None
    assert calls == [1] and sam.step_skipped and sam.sharpness is None
    assert_bitwise(snapshot(model), w0)
    # a good step afterwards is taken (the closure left its NaN gradient in .grad)
    sam.zero_grad()
    plain_sam_run(model, sam, data[:1])
    assert not sam.step_skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("storage", ["swap", "copy"])
def test_nonfinite_perturbed_gradient_restores_and_skips(storage):
    model = make_model(seed=33)
    sam = SAM(model.parameters(), torch.optim.AdamW, lr=1e-2, storage=storage, skip_nonfinite="both")
    x, t = make_data(1, seed=34)[0]
    plain_sam_run(model, sam, [(x, t)])
    w0, s0 = snapshot(model), opt_state(sam)
    mse(model, x, t).backward()
    sam.first_step(zero_grad=True)
    assert not sam.step_skipped
    _poisoned_loss(model, x, t, True).backward()
    sam.second_step(zero_grad=True)
    assert sam.step_skipped
    assert_bitwise(snapshot(model), w0)
    assert_bitwise(opt_state(sam), s0)


@pytest.mark.parametrize("policy", ["clean", "both"])
def test_nonfinite_perturbed_loss_in_step_closure_skips_under_every_policy(policy):
    model = make_model(seed=40)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, skip_nonfinite=policy)
    data = make_data(2, seed=41)
    plain_sam_run(model, sam, data[:1])
    w0, s0 = snapshot(model), opt_state(sam)
    x, t = data[1]
    calls = []

    def closure():
        sam.zero_grad()
        loss = _poisoned_loss(model, x, t, bool(calls))  # finite at w, inf at w + e
        calls.append(1)
        loss.backward()
        return loss

    sam.step(closure)
    assert len(calls) == 2 and sam.step_skipped
    assert_bitwise(snapshot(model), w0)
    assert_bitwise(opt_state(sam), s0)


@pytest.mark.parametrize("pass_loss", [False, True])
def test_default_policy_keeps_a_nan_of_the_perturbed_pass_out_in_the_two_step_api(pass_loss):
    # "clean" checks what the step is built from: with second_step(loss=...) the perturbed
    # loss (a 0-d read), without it the perturbed gradient (the two-step API has no loss).
    model = make_model(seed=42)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert sam.skip_nonfinite == "clean"
    x, t = make_data(1, seed=43)[0]
    w0 = snapshot(model)
    mse(model, x, t).backward()
    sam.first_step(zero_grad=True)
    loss = _poisoned_loss(model, x, t, True)
    loss.backward()
    sam.second_step(zero_grad=True, loss=loss if pass_loss else None)
    assert sam.step_skipped
    assert_bitwise(snapshot(model), w0)
    assert opt_state(sam) == []  # the momentum buffers were never created


def test_skip_nonfinite_false_lets_nan_through_like_torch_optim():
    model = make_model(seed=35)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, skip_nonfinite=False)
    x, t = make_data(1)[0]
    _poisoned_loss(model, x, t, True).backward()
    sam.first_step(zero_grad=True)
    mse(model, x, t).backward()
    sam.second_step(zero_grad=True)
    assert not sam.step_skipped
    assert any(torch.isnan(p).any() for p in model.parameters())


def test_finite_gradient_with_overflowing_norm_gives_a_plain_base_step():
    # |g| = 3e38 is finite in float32 but ||g||^2 overflows: e must be 0, not NaN, and the
    # step is exactly SGD's.
    w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    sam = SAM([w], torch.optim.SGD, lr=1e-40, rho=0.05)
    g = torch.tensor([3e38, -3e38, 1.0])
    w.grad = g.clone()
    sam.first_step()
    assert not sam.step_skipped and torch.isinf(sam.grad_norm)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0, 3.0]))  # e = rho / inf * g = 0
    w.grad = g.clone()
    sam.second_step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0, 3.0]) - 1e-40 * g)


# -- accelerators: the non-finite check without a host sync in first_step ------------------
class _HostReads:
    """Counts (or forbids) reading a tensor's value from the host: bool(t), t.item(), float(t)."""

    def __init__(self, monkeypatch, forbid: bool):
        self.count = 0
        for name in ("__bool__", "item", "__float__"):
            real = getattr(torch.Tensor, name)

            def wrapper(t, *args, _real=real, _name=name):
                if forbid:
                    raise AssertionError(f"host sync through Tensor.{_name}")
                self.count += 1
                return _real(t, *args)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize(
    "policy, bad_pass",
    [("both", None), ("both", 1), ("both", 2), ("clean", None), ("clean", 1), ("clean", 2)],
)
@pytest.mark.parametrize("storage", ["swap", "copy"])
def test_accelerator_policy_checks_the_passes_with_one_sync_in_second_step(
    policy, bad_pass, storage, monkeypatch
):
    # On accelerators first_step() records a device-side flag instead of syncing; CPU runs the
    # same code when _sync_is_cheap says no.
    data = make_data(2, seed=36)

    def run(deferred: bool):
        model = make_model(seed=37)
        sam = SAM(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, adaptive=True, storage=storage,
            skip_nonfinite=policy,
        )
        plain_sam_run(model, sam, data[:1])
        w0, s0 = snapshot(model), opt_state(sam)
        x, t = data[1]
        _poisoned_loss(model, x, t, bad_pass == 1).backward()
        with monkeypatch.context() as m:
            if deferred:
                m.setattr(sam_torch._sam, "_sync_is_cheap", lambda device: False)
                _HostReads(m, forbid=True)
            sam.first_step(zero_grad=True)
        _poisoned_loss(model, x, t, bad_pass == 2).backward()
        with monkeypatch.context() as m:
            reads = _HostReads(m, forbid=False)
            sam.second_step(zero_grad=True)
        return model, sam, w0, s0, reads.count

    model, sam, w0, s0, n_reads = run(deferred=True)
    ref_model, ref_sam, _, _, _ = run(deferred=False)
    # The single host sync of a normal step; a skipped step confirms the fast (read-only)
    # check's negative with the exact one: a second sync, on that rare step only.
    # (the two-step API has no perturbed loss, so "clean" checks the perturbed gradient too)
    assert n_reads == (1 if bad_pass is None else 2)
    assert sam.step_skipped == (bad_pass is not None) == ref_sam.step_skipped
    assert_bitwise(snapshot(model), snapshot(ref_model))
    assert_bitwise(opt_state(sam), opt_state(ref_sam))
    if bad_pass is not None:
        assert_bitwise(snapshot(model), w0)
        assert_bitwise(opt_state(sam), s0)


def test_accelerator_policy_with_grad_scaler_backs_off_and_skips(monkeypatch):
    monkeypatch.setattr(sam_torch._sam, "_sync_is_cheap", lambda device: False)
    model = make_model(seed=38)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    amp = ScaledSAM(sam, scaler)
    x, t = make_data(1, seed=39)[0]
    w0 = snapshot(model)

    def closure():
        sam.zero_grad()
        loss = _poisoned_loss(model, x, t, not calls)
        calls.append(1)
        amp.scale(loss).backward()
        return loss

    calls: list[int] = []
    amp.step(closure)  # inf in the clean pass: the perturbed pass runs, the step is skipped
    assert sam.step_skipped and len(calls) == 2
    assert_bitwise(snapshot(model), w0)
    # each pass is one scaler iteration and both saw inf (the second ran at non-finite w + e):
    # two back-offs, where the CPU policy (which skips the second pass) makes one
    assert scaler.get_scale() == 2.0**8


def test_scaled_sam_survives_an_exception_after_unscale_and_reports_scaler_errors():
    model = make_model(seed=40, dtype=torch.float32)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    amp = ScaledSAM(sam, torch.amp.GradScaler("cpu", init_scale=2.0**4))
    x, t = make_data(1, seed=41, dtype=torch.float32)[0]
    w0 = snapshot(model)
    calls = []

    def failing_closure():
        sam.zero_grad()
        loss = mse(model, x, t)
        amp.scale(loss).backward()
        calls.append(1)
        if len(calls) == 2:
            amp.unscale_()  # e.g. before clipping, then the user's code fails
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        amp.step(failing_closure)
    assert not sam.is_perturbed
    assert_bitwise(snapshot(model), w0)

    def closure():
        sam.zero_grad()
        loss = mse(model, x, t)
        amp.scale(loss).backward()
        return loss

    amp.step(closure)  # no "unscale_() has already been called on this optimizer"
    assert not sam.step_skipped
    ref_model = make_model(seed=40, dtype=torch.float32)
    plain_sam_run(ref_model, SAM(ref_model.parameters(), torch.optim.SGD, lr=0.1), [(x, t)])
    assert_bitwise(snapshot(model), snapshot(ref_model))

    # GradScaler's own refusal (float16 gradients) propagates unmasked
    half = make_model(seed=42, dtype=torch.float16)
    amp16 = ScaledSAM(SAM(half.parameters(), torch.optim.SGD, lr=0.1), torch.amp.GradScaler("cpu"))
    amp16.scale(mse(half, x.half(), t.half())).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        amp16.first_step()
    assert not amp16.optimizer.is_perturbed


@pytest.mark.parametrize("error", [_Boom("closure failed"), KeyboardInterrupt()], ids=["closure", "keyboard_interrupt"])
def test_exception_in_the_clean_pass_changes_nothing(error):
    model = make_model(seed=43)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    data = make_data(2, seed=44)
    plain_sam_run(model, sam, data[:1])
    w0, s0 = snapshot(model), opt_state(sam)

    def closure():
        sam.zero_grad()
        mse(model, *data[1]).backward()
        raise error

    with pytest.raises(type(error)):
        sam.step(closure)
    assert not sam.is_perturbed
    assert_bitwise(snapshot(model), w0)
    assert_bitwise(opt_state(sam), s0)
    sam.zero_grad()
    plain_sam_run(model, sam, data[1:])  # the next step runs normally
    assert not sam.step_skipped
