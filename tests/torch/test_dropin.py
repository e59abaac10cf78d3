"""``sam_torch.SAM`` as a drop-in for the popular PyTorch SAM wrapper (float64, same seeds).

``WrapperSAM`` below is written from that wrapper's documented algorithm, a plain loop over
tensors: ``first_step`` saves ``w`` (as ``"old_p"`` in its state, the key of that wrapper's
checkpoints) and adds :math:`e = \\rho\\, T^2 g / (\\lVert T g \\rVert
+ 10^{-12})` (``T = 1``, or ``|w|`` in its adaptive mode), ``second_step`` puts ``w`` back and
steps the base optimizer, and ``step(closure)`` expects the clean backward done by the
caller: ``first_step(zero_grad=True)``, the closure (once, at ``w + e``), ``second_step()``.
Its batch-norm recipe sets each layer's ``momentum`` to 0 for the perturbed pass and back.
The README loops of that wrapper run here verbatim, once with it and once with
``sam_torch``, and must give the same weights and running statistics.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import sam_torch
from sam_torch import SAM

STEPS = 4
# float64: the two sum the norm in another order (last-bit differences, far below any
# algorithmic difference: the gradients accumulated twice are 1e-1 off after 3 steps)
RTOL = 1e-12


class WrapperSAM(torch.optim.Optimizer):
    """The popular wrapper's algorithm, one tensor at a time (the test's reference)."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        terms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    weighted = p.grad * (p.abs() if group["adaptive"] else 1.0)
                    terms.append(weighted.norm())
        grad_norm = torch.stack(terms).norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                direction = p.grad * (p * p if group["adaptive"] else 1.0)
                p.add_(direction * scale)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.copy_(self.state[p]["old_p"])
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()

    def load_state_dict(self, state_dict):
        # Its own state and groups only; the base optimizer's state is not in its state_dict.
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups


def wrapper_disable_running_stats(model):
    """The wrapper's recipe: batch-norm momentum 0 (running values kept, count still grows)."""
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.saved_momentum = m.momentum
            m.momentum = 0


def wrapper_enable_running_stats(model):
    for m in model.modules():
        if isinstance(m, _BatchNorm) and hasattr(m, "saved_momentum"):
            m.momentum = m.saved_momentum


def make_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 3)
    ).double()


def make_data(n: int = STEPS):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
        for _ in range(n)
    ]


loss_function = nn.functional.cross_entropy


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if not k.endswith(skip):
            torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=0, msg=k)


def readme_closure_loop(optimizer_cls, base, dropout=0.0, **kw):
    """The wrapper README's closure loop, verbatim (its closure does not zero the grads)."""
    model = make_model(dropout)
    optimizer = optimizer_cls(model.parameters(), base, **kw)
    torch.manual_seed(2)
    for input, output in make_data():

        def closure(input=input, output=output):
            loss = loss_function(model(input), output)
            loss.backward()
            return loss

        loss = loss_function(model(input), output)
        loss.backward()
        optimizer.step(closure)
        optimizer.zero_grad()
    return model, optimizer


def readme_two_step_bn_loop(optimizer_cls, enable, disable, **kw):
    """The wrapper README's two-step loop with its batch-norm calls, verbatim."""
    model = make_model()
    optimizer = optimizer_cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)
    for inputs, targets in make_data():
        enable(model)
        predictions = model(inputs)
        loss = loss_function(predictions, targets)
        loss.mean().backward()
        optimizer.first_step(zero_grad=True)
        disable(model)
        loss_function(model(inputs), targets).mean().backward()
        optimizer.second_step(zero_grad=True)
    return model


@pytest.mark.parametrize(
    "base, kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, rho=0.5, adaptive=True)),
        (torch.optim.Adam, dict(lr=0.01, eps=0.1)),  # eps large enough to matter
    ],
)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_readme_closure_loop_gives_the_wrappers_trajectory(base, kw, dropout):
    # The user's backward before step() is the clean pass: one closure call, at w + e, so
    # the batch-norm running statistics (two updates per step) and the dropout masks are
    # the wrapper's too. adaptive=True with eta=0 is the wrapper's adaptive mode.
    ours_kw = dict(kw, eta=0.0) if kw.get("adaptive") else kw
    ref_model, _ = readme_closure_loop(WrapperSAM, base, dropout, **kw)
    model, opt = readme_closure_loop(SAM, base, dropout, **ours_kw)
    assert_same(state(model), state(ref_model))
    assert state(model)["1.num_batches_tracked"] == 2 * STEPS
    assert opt.loss is None and opt.perturbed_loss is not None  # the clean loss was the user's


def test_adam_eps_reaches_the_base_optimizer():
    ref_model, _ = readme_closure_loop(WrapperSAM, torch.optim.Adam, lr=0.01, eps=0.1)
    default_eps, _ = readme_closure_loop(SAM, torch.optim.Adam, lr=0.01)
    model, opt = readme_closure_loop(SAM, torch.optim.Adam, lr=0.01, eps=0.1)
    assert opt.base_optimizer.param_groups[0]["eps"] == 0.1
    assert_same(state(model), state(ref_model))
    assert not torch.equal(state(default_eps)["0.weight"], state(model)["0.weight"])


def test_readme_two_step_loop_with_the_batch_norm_calls():
    # The same plain calls: identical weights, running means and variances; the count of
    # batches differs by design (the wrapper's momentum-0 trick still counts the perturbed
    # pass, sam_torch's frozen layers do not).
    ref = state(
        readme_two_step_bn_loop(WrapperSAM, wrapper_enable_running_stats, wrapper_disable_running_stats)
    )
    ours = state(
        readme_two_step_bn_loop(SAM, sam_torch.enable_running_stats, sam_torch.disable_running_stats)
    )
    assert_same(ours, ref, skip=("num_batches_tracked",))
    assert ref["1.num_batches_tracked"] == 2 * STEPS
    assert ours["1.num_batches_tracked"] == STEPS
    # and the running statistics are those of the clean passes: not what no freezing gives
    free = state(readme_two_step_bn_loop(SAM, lambda m: None, lambda m: None))
    assert not torch.equal(free["1.running_mean"], ours["1.running_mean"])


def torch_contract_loop(model, optimizer, zero_in_closure: bool):
    for x, y in make_data():

        def closure(x=x, y=y):
            if zero_in_closure:
                optimizer.zero_grad()
            loss = loss_function(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return state(model)


@pytest.mark.parametrize("zero_in_closure", [True, False])
def test_torch_optim_closure_loop_calls_the_closure_at_w_and_at_w_plus_e(zero_in_closure):
    # No backward before step(): SAM runs the clean pass itself, zeroing the gradients before
    # each closure call, so a closure that does not zero them gives the same steps; equal to
    # the wrapper's two-step loop with no batch-norm calls (two forward passes per step).
    ref = state(readme_two_step_bn_loop(WrapperSAM, lambda m: None, lambda m: None))
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    calls = []
    orig = model.forward
    model.forward = lambda x: (calls.append(1), orig(x))[1]
    assert_same(torch_contract_loop(model, opt, zero_in_closure), ref)
    assert len(calls) == 2 * STEPS
    assert opt.loss is not None and opt.sharpness is not None


def test_model_argument_freezes_batch_norm_in_the_perturbed_pass_of_step_closure():
    # step(closure) with SAM(model=model): running statistics from the clean pass only, one
    # count per step, equal to the two-step recipe with frozen layers, closure untouched.
    ref = state(readme_two_step_bn_loop(SAM, sam_torch.enable_running_stats, sam_torch.disable_running_stats))
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    got = torch_contract_loop(model, opt, zero_in_closure=False)
    assert_same(got, ref)
    assert got["1.num_batches_tracked"] == STEPS
    # and in the wrapper's loop (the user's backward is the clean pass)
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    for x, y in make_data():
        loss_function(model(x), y).backward()
        opt.step(lambda x=x, y=y: loss_function(model(x), y).backward())
        opt.zero_grad()
    assert_same(state(model), ref)
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, _BatchNorm))


def test_stale_gradients_are_not_taken_for_a_fresh_backward():
    # Gradients the last step left (no zero_grad in the loop) and gradients zeroed in place
    # by the optimizer are not a clean pass: the closure is called twice.
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    data = make_data()
    calls = []

    def closure(x, y):
        calls.append(1)
        loss = loss_function(model(x), y)
        loss.backward()
        return loss

    opt.step(lambda: closure(*data[0]))
    assert len(calls) == 2
    opt.step(lambda: closure(*data[1]))  # the previous step's gradients are still there
    assert len(calls) == 4
    opt.zero_grad(set_to_none=False)
    opt.step(lambda: closure(*data[2]))
    assert len(calls) == 6
    loss_function(model(data[3][0]), data[3][1]).backward()  # accumulates in place: fresh
    opt.step(lambda: closure(*data[3]))
    assert len(calls) == 7


def test_disable_running_stats_plain_call_and_context_manager():
    model = make_model()
    bn = model[1]
    x = make_data(1)[0][0]
    sam_torch.disable_running_stats(model)
    before = copy.deepcopy(bn.state_dict())
    model(x)
    assert_same(bn.state_dict(), before)
    sam_torch.enable_running_stats(model)
    sam_torch.enable_running_stats(model)  # idempotent
    model(x)
    assert bn.num_batches_tracked == 1
    with sam_torch.disable_running_stats(model):
        model(x)
    assert bn.num_batches_tracked == 1 and bn.track_running_stats
    with pytest.raises(KeyError), sam_torch.disable_running_stats(model):
        raise KeyError("restored anyway")
    assert bn.track_running_stats
    # a layer built without running statistics is left alone
    plain = nn.BatchNorm1d(8, track_running_stats=False)
    sam_torch.disable_running_stats(plain)
    sam_torch.enable_running_stats(plain)
    assert not plain.track_running_stats
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        sam_torch.disable_running_stats([bn])


def test_model_argument_freezes_batch_norm_in_the_perturbed_block_and_scaled_sam():
    ref = state(readme_two_step_bn_loop(SAM, sam_torch.enable_running_stats, sam_torch.disable_running_stats))
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    for x, y in make_data():
        loss_function(model(x), y).backward()
        with opt.perturbed():
            loss_function(model(x), y).backward()
    assert_same(state(model), ref)
    # ScaledSAM's closure API (a disabled scaler: plain float64 steps)
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    amp = sam_torch.ScaledSAM(opt, torch.amp.GradScaler("cpu", enabled=False))
    for x, y in make_data():
        amp.step(lambda x=x, y=y: amp.scale(loss_function(model(x), y)).backward())
    assert_same(state(model), ref)
