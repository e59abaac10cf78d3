"""A checkpoint of the popular PyTorch SAM wrapper loads into ``sam_torch.SAM`` (float64).

That wrapper's ``state_dict()`` is its own state, ``{"old_p": copy of w}`` per parameter,
with the param groups it shares with its base optimizer; the base optimizer's state lives
in ``optimizer.base_optimizer.state`` and is not saved with it. ``WrapperSAM`` (the test
reference of ``test_dropin``, written from that wrapper's algorithm, with its
``load_state_dict``) trains a few steps, is checkpointed, and:

* ``optimizer.state_dict()`` loaded into ``sam_torch.SAM``: the copies are dropped with a
  warning, the base optimizer starts fresh (no momentum, Adam at step 0); the run equals
  the wrapper resumed from its own checkpoint, and, with momentum, differs from the
  uninterrupted run as that one does;
* ``optimizer.base_optimizer.state_dict()`` (the base state and the same groups), or a dict
  whose entries hold ``old_p`` beside the base state: the run continues exactly.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

import sam_torch
from tests.torch.test_dropin import WrapperSAM, loss_function, make_data

BEFORE, AFTER = 3, 3
RTOL = 1e-12  # float64; the two sum the norm in another order

BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
}


def make_model() -> torch.nn.Module:
    # No batch norm after a biased layer here: that bias's gradient is 0 up to rounding,
    # which Adam's normalization turns into steps of size lr (noise, not a difference).
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def train(model, opt, data):
    """The wrapper README's two-step loop."""
    for x, y in data:
        loss_function(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_function(model(x), y).backward()
        opt.second_step(zero_grad=True)


def weights(model):
    return [t.detach().clone() for t in model.state_dict().values()]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=0)


def checkpoint(base: str, adaptive: bool):
    """The wrapper after BEFORE steps: model, its state_dict, its base's state_dict, and the
    weights of the uninterrupted run after AFTER more steps."""
    cls, kw = BASES[base]
    data = make_data(BEFORE + AFTER)
    model = make_model()
    wrapper = WrapperSAM(model.parameters(), cls, rho=0.1, adaptive=adaptive, **kw)
    train(model, wrapper, data[:BEFORE])
    saved = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(wrapper.state_dict()),
        copy.deepcopy(wrapper.base_optimizer.state_dict()),
    )
    train(model, wrapper, data[BEFORE:])
    return saved, weights(model), data[BEFORE:]


def resumed_sam(base: str, adaptive: bool, model_state, opt_state):
    cls, kw = BASES[base]
    model = make_model()
    model.load_state_dict(model_state)
    # eta=0.0: the wrapper's adaptive mode; rho and the base hyperparameters come from the groups
    sam = sam_torch.SAM(model.parameters(), cls, adaptive=adaptive, eta=0.0, **kw)
    sam.load_state_dict(opt_state)
    return model, sam


def resumed_wrapper(base: str, adaptive: bool, model_state, opt_state):
    cls, kw = BASES[base]
    model = make_model()
    model.load_state_dict(model_state)
    wrapper = WrapperSAM(model.parameters(), cls, rho=0.1, adaptive=adaptive, **kw)
    wrapper.load_state_dict(opt_state)
    return model, wrapper


CASES = [("sgd-momentum", False), ("adam", False), ("adam", True)]


@pytest.mark.parametrize(("base", "adaptive"), CASES)
def test_wrapper_state_dict_loads_and_the_base_optimizer_starts_fresh(base, adaptive):
    (model_state, wrapper_state, _), uninterrupted, rest = checkpoint(base, adaptive)
    assert all(set(entry) == {"old_p"} for entry in wrapper_state["state"].values())
    with pytest.warns(UserWarning, match=re.escape("its per-parameter 'old_p' entries")) as record:
        model, sam = resumed_sam(base, adaptive, model_state, wrapper_state)
    (message,) = [str(w.message) for w in record]
    assert f"holds no state of the base optimizer {BASES[base][0].__name__}" in message
    assert "optimizer.base_optimizer.state_dict()" in message
    assert not sam.state  # fresh: the base optimizer builds its state on the next step
    assert wrapper_state["state"][0].keys() == {"old_p"}  # the caller's dict is left alone
    assert sam.param_groups[0]["rho"] == 0.1 and sam.param_groups[0]["sam_eps"] == 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, sam, rest)  # no KeyError('exp_avg')
    ref_model, wrapper = resumed_wrapper(base, adaptive, model_state, wrapper_state)
    train(ref_model, wrapper, rest)
    assert_same(weights(model), weights(ref_model))  # what the wrapper itself resumes to
    if base == "sgd-momentum":  # the momentum the checkpoint did not hold is missing in both
        assert not torch.allclose(weights(model)[0], uninterrupted[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize(("base", "adaptive"), CASES)
def test_wrapper_base_optimizer_state_continues_exactly(base, adaptive):
    (model_state, _, base_state), uninterrupted, rest = checkpoint(base, adaptive)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to drop here
        model, sam = resumed_sam(base, adaptive, model_state, base_state)
    train(model, sam, rest)
    assert_same(weights(model), uninterrupted)


@pytest.mark.parametrize(("base", "adaptive"), CASES)
def test_old_p_beside_the_base_state_is_dropped_and_the_run_continues_exactly(base, adaptive):
    (model_state, wrapper_state, base_state), uninterrupted, rest = checkpoint(base, adaptive)
    merged = {
        "state": {i: {**wrapper_state["state"][i], **base_state["state"][i]} for i in base_state["state"]},
        "param_groups": wrapper_state["param_groups"],
    }
    base_keys = {"sgd-momentum": {"momentum_buffer"}, "adam": {"step", "exp_avg", "exp_avg_sq"}}[base]
    assert all(set(e) == base_keys | {"old_p"} for e in merged["state"].values())
    with pytest.warns(UserWarning, match="state saved beside them is loaded") as record:
        model, sam = resumed_sam(base, adaptive, model_state, merged)
    assert "fresh state" not in str(record[0].message)
    assert all(set(e) == base_keys for e in sam.state.values())
    train(model, sam, rest)
    assert_same(weights(model), uninterrupted)


def test_old_wrapper_versions_e_w_entries_are_dropped_too():
    (model_state, wrapper_state, _), _, rest = checkpoint("sgd-momentum", False)
    older = {
        "state": {i: {"e_w": e["old_p"] * 0.01} for i, e in wrapper_state["state"].items()},
        "param_groups": wrapper_state["param_groups"],
    }
    with pytest.warns(UserWarning, match=re.escape("its per-parameter 'e_w' entries")):
        model, sam = resumed_sam("sgd-momentum", False, model_state, older)
    assert not sam.state
    train(model, sam, rest)
