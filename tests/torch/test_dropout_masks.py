"""Dropout masks per entry point: the same masks in both passes of a step, fresh ones across
steps (``dropout="same"``, the default), new ones at w + e with ``dropout="fresh"``.

Masks are recorded with a forward hook on a real ``nn.Dropout`` whose input has no zero, so
``output == 0`` is the dropped set. Under ``torch.func.vmap`` no hook can see a chunk's mask,
so there the loss is made linear in the weights: then ``L_c(w + e_c) - L_c(w)`` equals
``rho * ||g_c||`` exactly when the perturbed pass draws the clean pass's mask.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sam_torch
from sam_torch import SAM, RNGReplay, ScaledSAM, m_sharpness_step

P = 0.5
STEPS = 3


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Dropout(P), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def record_masks(model: nn.Module) -> list[torch.Tensor]:
    masks: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda mod, i, o: masks.append((o == 0).clone()))
    return masks


def batches(n: int = STEPS, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(size, 6, generator=g, dtype=torch.float64) + 3.0  # no zero entry
        out.append((x, torch.randint(0, 3, (size,), generator=g)))
    return out


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def assert_same_within_fresh_across(masks, passes=2):
    """masks in groups of `passes` per step (or chunk): equal inside a group, not across."""
    assert len(masks) % passes == 0 and len(masks) >= 2 * passes
    for i in range(0, len(masks), passes):
        for j in range(1, passes):
            assert torch.equal(masks[i], masks[i + j])
    assert masks[0].any() and not masks[0].all()
    # every pass of a group differs from every pass of any other group
    for i in range(0, len(masks), passes):
        for j in range(i + passes, len(masks)):
            assert not torch.equal(masks[i], masks[j])


def closure_loop(sam_cls=SAM, steps=STEPS, model=None, **kw):
    model = make_model() if model is None else model
    masks = record_masks(model)
    opt = sam_cls(model.parameters(), torch.optim.SGD, lr=0.1, **kw)
    torch.manual_seed(5)
    for x, y in batches(steps):
        def closure(x=x, y=y):
            loss = loss_of(model, x, y)
            loss.backward()
            return loss
        opt.step(closure)
    return model, opt, masks


@pytest.mark.parametrize("sam_cls", [SAM, sam_torch.GSAM, sam_torch.FriendlySAM])
def test_step_closure_uses_the_same_masks_in_both_passes_and_fresh_ones_each_step(sam_cls):
    _, opt, masks = closure_loop(sam_cls)
    assert len(masks) == 2 * STEPS
    assert_same_within_fresh_across(masks)
    assert opt.dropout == "same"


def test_step_closure_fresh_option_draws_new_masks_at_w_plus_e():
    _, _, masks = closure_loop(dropout="fresh")
    assert len(masks) == 2 * STEPS
    assert all(not torch.equal(masks[i], masks[i + 1]) for i in range(0, len(masks), 2))


def test_rho_zero_with_same_masks_is_the_base_optimizers_trajectory_bit_for_bit():
    # rho = 0: the perturbed pass runs at w with the clean pass's masks, so its gradient is
    # the clean one exactly; the generators continue from where the clean pass left them,
    # so the next steps draw what a plain SGD loop draws.
    model, _, _ = closure_loop(rho=0.0)
    plain = make_model()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    torch.manual_seed(5)
    for x, y in batches():
        opt.zero_grad()
        loss_of(plain, x, y).backward()
        opt.step()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    fresh, _, _ = closure_loop(rho=0.0, dropout="fresh")
    assert any(not torch.equal(a, b) for a, b in zip(fresh.parameters(), plain.parameters(), strict=True))


def test_the_popular_wrappers_loop_draws_fresh_masks():
    # loss.backward() before step(closure): the clean pass ran before step was called, so
    # nothing can replay it; the closure's single call at w + e draws new masks.
    model = make_model()
    masks = record_masks(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for x, y in batches():
        loss_of(model, x, y).backward()
        opt.step(lambda x=x, y=y: loss_of(model, x, y).backward())
        opt.zero_grad()
    assert len(masks) == 2 * STEPS
    assert all(not torch.equal(masks[i], masks[i + 1]) for i in range(0, len(masks), 2))


def test_two_step_api_with_rng_replay():
    model = make_model()
    masks = record_masks(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for x, y in batches():
        replay = RNGReplay(model)
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        after_clean = torch.get_rng_state()
        with replay:
            loss_of(model, x, y).backward()
        assert torch.equal(torch.get_rng_state(), after_clean)  # the stream goes on from there
        opt.second_step(zero_grad=True)
    assert_same_within_fresh_across(masks)

    masks.clear()  # without it: the user's loop, fresh masks
    for x, y in batches():
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
    assert all(not torch.equal(masks[i], masks[i + 1]) for i in range(0, len(masks), 2))


def test_rng_replay_is_reusable_and_refuses_nesting_and_bad_devices():
    replay = RNGReplay()
    first = torch.rand(5)
    for _ in range(2):
        with replay:
            assert torch.equal(torch.rand(5), first)
    with replay, pytest.raises(RuntimeError, match="already active"):
        with replay:
            pass
    assert torch.equal(torch.rand(5), torch.rand(5)) is False
    with pytest.raises(TypeError, match="devices must be"):
        RNGReplay(3.5)
    with pytest.raises(TypeError, match="is not a device"):
        RNGReplay(["not-a-device"])
    assert RNGReplay([torch.zeros(1), "cpu"]).devices == []  # the CPU generator only
    assert repr(RNGReplay(nn.Linear(2, 2))) == "RNGReplay(cpu)"


def test_dropout_argument_is_validated():
    with pytest.raises(ValueError, match="dropout must be 'same' or 'fresh', got 'new'"):
        SAM(make_model().parameters(), torch.optim.SGD, lr=0.1, dropout="new")
    assert sam_torch.GSAM(make_model().parameters(), torch.optim.SGD, lr=0.1,
                          dropout="fresh").dropout == "fresh"


@pytest.mark.parametrize("dropout", ["same", "fresh"])
def test_scaled_sam_step_follows_the_sams_dropout_setting(dropout):
    model = make_model()
    masks = record_masks(model)
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, dropout=dropout)
    amp = ScaledSAM(sam, torch.amp.GradScaler("cpu", enabled=False))
    for x, y in batches():
        def closure(x=x, y=y):
            loss = loss_of(model, x, y)
            loss.backward()
            return loss
        amp.step(closure)
    assert len(masks) == 2 * STEPS
    if dropout == "same":
        assert_same_within_fresh_across(masks)
    else:
        assert all(not torch.equal(masks[i], masks[i + 1]) for i in range(0, len(masks), 2))


# -- m-sharpness ------------------------------------------------------------------------
def chunk_loss(model, chunk):
    x, y = chunk
    return loss_of(model, x, y)


@pytest.mark.parametrize("dropout", ["same", "fresh"])
def test_m_sharpness_loop_masks(dropout):
    model = make_model()
    masks = record_masks(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, dropout=dropout)
    k = 4
    for batch in batches(2):
        m_sharpness_step(opt, model, chunk_loss, batch, m=8 // k, vectorize=False)
    assert len(masks) == 2 * k * 2  # 2 steps x k chunks x (clean + perturbed)
    if dropout == "same":  # a chunk's two passes share masks; every chunk has its own
        assert_same_within_fresh_across(masks)
    else:
        assert all(not torch.equal(masks[i], masks[i + 1]) for i in range(0, len(masks), 2))


class BlockLinear(nn.Module):
    """loss_c = mean_i dropout(x_i) . w: linear in w, chunk c's inputs only in block c of w."""

    def __init__(self, k: int, d: int) -> None:
        super().__init__()
        self.drop = nn.Dropout(P)
        torch.manual_seed(3)
        self.w = nn.Parameter(torch.randn(k * d, dtype=torch.float64))

    def forward(self, x):
        return self.drop(x) @ self.w


def block_batch(k: int, m: int, d: int) -> torch.Tensor:
    x = torch.zeros(k * m, k * d, dtype=torch.float64)
    for c in range(k):
        x[c * m:(c + 1) * m, c * d:(c + 1) * d] = 1.0
    return x


def linear_loss(model, chunk):
    return model(chunk).mean()


@pytest.mark.parametrize("vectorize", [True, False])
def test_m_sharpness_masks_through_a_linear_loss(vectorize):
    # Same masks in a chunk's two passes  <=>  L_c(w + e_c) - L_c(w) = g_c . e_c = rho ||g_c||
    # for every chunk, so the step's sharpness is rho times the mean norm exactly.
    k, m, d, rho = 4, 3, 5, 0.1
    results = {}
    for dropout in ("same", "fresh"):
        model = BlockLinear(k, d)
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0, rho=rho, dropout=dropout)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the vectorized path runs: no fallback warning
            m_sharpness_step(opt, model, linear_loss, block_batch(k, m, d), m=m,
                             vectorize=vectorize)
        results[dropout] = (float(opt.sharpness), rho * float(opt.grad_norm), model.w.grad)
    sharpness, expected, grad = results["same"]
    assert sharpness == pytest.approx(expected, rel=1e-10)
    # every chunk its own masks: the blocks of G (chunk c's perturbed-pass mask mean) differ
    blocks = grad.reshape(k, d)
    assert all(not torch.equal(blocks[i], blocks[j]) for i in range(k) for j in range(i))
    fresh_sharpness, fresh_expected, _ = results["fresh"]
    assert fresh_sharpness != pytest.approx(fresh_expected, rel=1e-3)


def test_m_sharpness_auto_runs_a_dropout_model_vectorized():
    # vectorize="auto" used to fall back to the loop (with a warning) for every dropout model.
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m_sharpness_step(opt, model, chunk_loss, batches(1)[0], m=2, vectorize="auto")
        m_sharpness_step(opt, model, chunk_loss, batches(1)[0], m=2, vectorize=True,
                         chunk_size=2)
    assert model not in sam_torch._msharpness._NOT_VECTORIZABLE
    assert not opt.is_perturbed and torch.isfinite(opt.sharpness)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generators_are_replayed():
    device = torch.device("cuda")
    model = make_model().to(device)
    masks = record_masks(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert RNGReplay(model).devices == [torch.device("cuda", torch.cuda.current_device())]
    for x, y in batches():
        x, y = x.to(device), y.to(device)
        def closure(x=x, y=y):
            loss = loss_of(model, x, y)
            loss.backward()
            return loss
        opt.step(closure)
    assert_same_within_fresh_across([m.cpu() for m in masks])
    m_sharpness_step(opt, model, chunk_loss, tuple(t.to(device) for t in batches(1)[0]), m=2,
                     vectorize=True)
