"""Bad input to sam_torch: the error type, a message that names the argument (and the fix),
and the weights left unchanged or restored. Each case is one row of docs/errors.md.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from sam_torch import SAM, ScaledSAM

torch.use_deterministic_algorithms(True)


def params3():
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]


def snapshot(ps):
    return [p.detach().clone() for p in ps]


def assert_unchanged(ps, before):
    for p, w in zip(ps, before, strict=True):
        assert torch.equal(p.detach(), w)


def with_grads(ps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return ps


# -- constructor -------------------------------------------------------------------------
BAD_HYPERPARAMETERS = [
    (dict(rho=-0.1), ValueError, "rho must be a finite number >= 0, got -0.1"),
    (dict(rho=float("nan")), ValueError, "rho must be a finite number >= 0, got nan"),
    (dict(rho=float("inf")), ValueError, "rho must be a finite number >= 0, got inf"),
    (dict(rho="0.05"), TypeError, "rho must be a real number, got str '0.05'"),
    (dict(rho=True), TypeError, "rho must be a real number, got the bool True"),
    (dict(rho=torch.ones(2)), ValueError, "rho must be a scalar, got an array of shape (2,)"),
    (dict(rho=1j), TypeError, "rho must be a real number, got the complex number 1j"),
    (dict(sam_eps=0.0), ValueError, "sam_eps must be a finite number > 0, got 0.0"),
    (dict(sam_eps=-1e-12), ValueError, "sam_eps must be a finite number > 0, got -1e-12"),
    (dict(sam_eps=float("nan")), ValueError, "sam_eps must be a finite number > 0, got nan"),
    (dict(eta=-0.01), ValueError, "eta must be a finite number >= 0, got -0.01"),
    (dict(eta=float("inf")), ValueError, "eta must be a finite number >= 0, got inf"),
    (dict(adaptive="yes"), TypeError, "adaptive must be True or False, got str 'yes'"),
    (dict(adaptive=1), TypeError, "adaptive must be True or False, got int 1"),
    (dict(adaptive=np.bool_(True)), TypeError, "adaptive must be True or False, got bool"),
    (dict(skip_nonfinite=None), TypeError, "skip_nonfinite must be one of 'clean' (the default), 'both' or False, got NoneType None"),
    (dict(skip_nonfinite=True), ValueError, "skip_nonfinite=True is ambiguous; pass one of 'clean' (the default), 'both' or False"),
    (dict(skip_nonfinite="always"), ValueError, "skip_nonfinite must be one of 'clean' (the default), 'both' or False, got 'always'"),
    (dict(skip_nonfinite=1), TypeError, "skip_nonfinite must be one of 'clean' (the default), 'both' or False, got int 1"),
    (dict(perturb_impl="fast"), ValueError, "perturb_impl must be 'auto', 'foreach', 'per_tensor' or 'compiled'"),
    (dict(storage="disk"), ValueError, "storage must be 'auto', 'swap' or 'copy', got 'disk'"),
    (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),  # the base optimizer's own check
]


@pytest.mark.parametrize(("kwargs", "exc", "message"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_are_rejected_in_the_constructor(kwargs, exc, message):
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(exc, match=re.escape(message)):
        SAM(params3(), torch.optim.SGD, **kwargs)


@pytest.mark.parametrize(
    ("group", "exc", "message"),
    [
        ({"rho": -1.0}, ValueError, "rho must be a finite number >= 0, got -1.0"),
        ({"adaptive": "no"}, TypeError, "adaptive must be True or False"),
        ({"eta": -1.0}, ValueError, "eta must be a finite number >= 0, got -1.0"),
        ({"sam_eps": 0.0}, ValueError, "eps must be a finite number > 0, got 0.0"),
    ],
)
def test_bad_per_group_hyperparameters_are_rejected(group, exc, message):
    a, b = params3()
    with pytest.raises(exc, match=re.escape(message)):
        SAM([{"params": [a]}, {"params": [b], **group}], torch.optim.SGD, lr=0.1)
    opt = SAM([a], torch.optim.SGD, lr=0.1)
    with pytest.raises(exc, match=re.escape(message)):
        opt.add_param_group({"params": [b], **group})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1


def test_base_optimizer_must_be_a_class_or_factory():
    ps = params3()
    with pytest.raises(TypeError, match=r"base_optimizer must be an optimizer class.*got an instance of SGD.*SAM\(params, torch.optim.SGD, lr=0.1"):
        SAM(ps, torch.optim.SGD(ps, lr=0.1), lr=0.1)
    with pytest.raises(TypeError, match=re.escape("base_optimizer must be an optimizer class such as torch.optim.SGD, got 'sgd'; pass the class itself")):
        SAM(ps, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer Adadelta takes 'rho'"):
        SAM(ps, torch.optim.Adadelta)


def test_params_given_twice_in_one_group():
    a, b = params3()
    with pytest.raises(ValueError, match=re.escape("param group 0 lists the same parameter (shape (4, 3)) twice; pass each parameter once")):
        SAM([a, b, a], torch.optim.SGD, lr=0.1)


def test_params_given_in_two_groups():
    a, b = params3()
    with pytest.raises(ValueError, match=re.escape("param group 1 repeats a parameter (shape (3,)) of param group 0; each parameter may belong to one group only")):
        SAM([{"params": [a, b]}, {"params": [b]}], torch.optim.SGD, lr=0.1)
    opt = SAM([a, b], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="param group 1 repeats a parameter"):
        opt.add_param_group({"params": [a]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("empty", [[], (), iter([]), nn.ReLU().parameters()], ids=["list", "tuple", "iterator", "parameterless_model"])
def test_empty_param_list(empty):
    with pytest.raises(ValueError, match="params is empty: SAM got no parameters to optimize"):
        SAM(empty, torch.optim.SGD, lr=0.1)


def test_params_of_the_wrong_type():
    with pytest.raises(TypeError, match=re.escape("params must be an iterable of tensors or of param-group dicts, got a single tensor of shape (3,); wrap it in a list")):
        SAM(torch.randn(3, requires_grad=True), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=re.escape("param group 0: optimizer params must be tensors, got ndarray; pass the model's parameters")):
        SAM([np.zeros(3)], torch.optim.SGD, lr=0.1)
    opt = SAM(params3(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="param_group must be a dict, got list"):
        opt.add_param_group([nn.Parameter(torch.zeros(2))])


def test_complex_parameters_are_rejected_with_the_fix():
    z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"SAM does not support complex parameters \(got torch.complex64, shape \(3,\)\); optimize torch.view_as_real"):
        SAM([z], torch.optim.SGD, lr=0.1)


def test_meta_parameters_are_rejected_at_construction():
    a = nn.Parameter(torch.randn(3))
    m = nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match=r"param group 0: a parameter \(shape \(3,\)\) is on the meta device"):
        SAM([a, m], torch.optim.SGD, lr=0.1)


def test_one_dtype_per_group_keeps_the_norm_global():
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = SAM([{"params": [a]}, {"params": [b]}], torch.optim.SGD, lr=0.1, rho=1.0)
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((3,), 4.0, dtype=torch.float64)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.first_step()
    torch.testing.assert_close(a.detach() - a0, torch.full((3,), 3.0 / (5.0 * 3**0.5)))
    torch.testing.assert_close(b.detach() - b0, torch.full((3,), 4.0 / (5.0 * 3**0.5), dtype=torch.float64))


# -- call order --------------------------------------------------------------------------
def test_second_step_without_first_step_leaves_weights_unchanged():
    ps = with_grads(params3())
    opt = SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9)
    w0 = snapshot(ps)
    with pytest.raises(RuntimeError, match=r"second_step\(\) was called without first_step\(\): call first_step\(\)"):
        opt.second_step()
    assert_unchanged(ps, w0)
    assert opt.state_dict()["state"] == {}  # no base step, no momentum buffer


def test_first_step_twice_does_not_perturb_twice():
    ps = with_grads(params3())
    opt = SAM(ps, torch.optim.SGD, lr=0.1)
    w0 = snapshot(ps)
    opt.first_step()
    w_e = snapshot(ps)
    with pytest.raises(RuntimeError, match=r"first_step\(\) was called twice without second_step\(\).*Call second_step\(\) \(or restore\(\)\)"):
        opt.first_step()
    assert_unchanged(ps, w_e)  # still the first perturbation
    with pytest.raises(RuntimeError, match="called twice"), opt.perturbed():
        pass
    assert opt.is_perturbed  # the pending step belongs to the user: not cancelled
    opt.restore()
    assert_unchanged(ps, w0)


def test_step_with_a_pending_first_step_raises():
    ps = with_grads(params3())
    opt = SAM(ps, torch.optim.SGD, lr=0.1)
    opt.first_step()
    w_e = snapshot(ps)
    with pytest.raises(RuntimeError, match=r"step\(closure\) called between first_step\(\) and second_step\(\)"):
        opt.step(lambda: None)
    assert_unchanged(ps, w_e)


def test_state_dict_while_perturbed():
    ps = with_grads(params3())
    opt = SAM(ps, torch.optim.SGD, lr=0.1)
    sd = opt.state_dict()
    opt.first_step()
    for call, name in ((opt.state_dict, "state_dict()"), (lambda: opt.load_state_dict(sd), "load_state_dict()")):
        with pytest.raises(RuntimeError, match=re.escape(f"{name} called between first_step() and second_step()")):
            call()
    assert opt.is_perturbed


# -- closures ----------------------------------------------------------------------------
def test_step_without_closure():
    ps = with_grads(params3())
    opt = SAM(ps, torch.optim.SGD, lr=0.1)
    w0 = snapshot(ps)
    with pytest.raises(RuntimeError, match=r"SAM.step\(\) needs a closure.*or call first_step\(\) and second_step\(\)"):
        opt.step()
    with pytest.raises(TypeError, match=r"closure must be a callable taking no arguments, got Tensor; pass the function itself"):
        opt.step(torch.tensor(1.0))
    assert_unchanged(ps, w0)
    assert not opt.is_perturbed


def test_closure_returning_none_still_steps():
    # Decision: accepted, as torch.optim does; the losses are then unknown (None).
    x = torch.randn(6, 3)
    results = []
    for returns_loss in (True, False):
        w = nn.Parameter(torch.linspace(-1.0, 1.0, 3))
        opt = SAM([w], torch.optim.SGD, lr=0.1)

        def closure(w=w, opt=opt, returns_loss=returns_loss):
            opt.zero_grad()
            loss = torch.sin(x @ w).sum()
            loss.backward()
            return loss if returns_loss else None

        out = opt.step(closure)
        assert (out is None) == (not returns_loss)
        assert (opt.sharpness is None) == (not returns_loss)
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], torch.linspace(-1.0, 1.0, 3))


# -- gradients ---------------------------------------------------------------------------
def test_sparse_gradient_is_rejected_before_anything_moves():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    lin = nn.Linear(4, 1)
    opt = SAM(list(lin.parameters()) + list(emb.parameters()), torch.optim.SGD, lr=0.1)
    lin(emb(torch.tensor([1, 2, 3]))).sum().backward()
    ps = list(lin.parameters()) + list(emb.parameters())
    w0 = snapshot(ps)
    with pytest.raises(RuntimeError, match=r"SAM does not support sparse gradients \(parameter of shape \(10, 4\)\); use dense gradients, e.g. nn.Embedding\(sparse=False\)"):
        opt.first_step()
    assert_unchanged(ps, w0)
    assert not opt.is_perturbed
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(lambda: lin(emb(torch.tensor([1]))).sum().backward())
    assert_unchanged(ps, w0)


def test_scaled_sam_misuse_keeps_weights():
    ps = params3()
    opt = SAM(ps, torch.optim.SGD, lr=0.1)
    amp = ScaledSAM(opt, torch.amp.GradScaler("cpu"))
    w0 = snapshot(ps)
    with pytest.raises(TypeError, match="closure must be a callable"):
        amp.step(None)
    with pytest.raises(RuntimeError, match="without first_step"):
        amp.second_step()
    assert_unchanged(ps, w0)
