"""sam_torch.m_sharpness_step against independent float64 references, and its contract."""

from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sam_torch
from sam_torch import _msharpness
from tests import helpers
from tests import reference as ref
from tests.msharpness import reference as msref

LR, MOMENTUM, WD = 0.1, 0.9, 5e-3
B = 16
VECTORIZE = [False, True, "auto"]


def _mse_loss(model, chunk):
    x, t = chunk
    return ((model(x) - t) ** 2).mean()


def _ce_loss(model, chunk):
    x, y = chunk
    return F.cross_entropy(model(x), y)


def _mlp_groups(model, adaptive):
    """Two groups: the first layer (SAM or ASAM, eta 0.01) and the second (rho x2, eta 0.02)."""
    return [
        dict(params=list(model[0].parameters()), rho=0.05, adaptive=adaptive, eta=0.01),
        dict(params=list(model[2].parameters()), rho=0.1, adaptive=adaptive, eta=0.02),
    ]


def _sam(groups, **kw):
    return sam_torch.SAM(groups, torch.optim.SGD, lr=LR, momentum=MOMENTUM, weight_decay=WD, **kw)


def _mlp_from_numpy(params):
    model = helpers.torch_mlp()
    with torch.no_grad():
        for p, w in zip(model.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(w))
    return model


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("m", [1, 4, B])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_mlp_matches_numpy_reference(adaptive, m, vectorize):
    params = ref.init_mlp()
    batches = ref.make_batches(3, n=B)
    model = _mlp_from_numpy(params)
    opt = _sam(_mlp_groups(model, adaptive))
    cfg = [(0.05, adaptive, 0.01)] * 2 + [(0.1, adaptive, 0.02)] * 2
    bufs = None
    for x, t in batches:
        G, loss, ploss, norm = msref.numpy_mlp(params, x, t, m, cfg)
        out = sam_torch.m_sharpness_step(
            opt, model, _mse_loss, (torch.from_numpy(x), torch.from_numpy(t)), m=m,
            vectorize=vectorize,
        )
        params, bufs = msref.sgd_momentum(params, G, bufs, LR, MOMENTUM, WD)
        for p, g in zip(model.parameters(), G, strict=True):
            np.testing.assert_allclose(p.grad.numpy(), g, rtol=1e-12, atol=1e-15)
        for name, got, want in (
            ("loss", out, loss), ("opt.loss", opt.loss, loss), ("perturbed_loss", opt.perturbed_loss, ploss),
            ("sharpness", opt.sharpness, ploss - loss), ("grad_norm", opt.grad_norm, norm),
        ):
            assert got.ndim == 0, name
            np.testing.assert_allclose(float(got), want, rtol=1e-12, atol=1e-15, err_msg=name)
        assert not opt.step_skipped and not opt.is_perturbed
    assert helpers.max_rel_diff([p.detach().numpy() for p in model.parameters()], params) < 1e-12


class BNNet(nn.Module):
    """conv -> BatchNorm2d -> tanh -> conv -> BatchNorm2d(momentum=None) -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, momentum=0.3)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(5, momentum=None)  # cumulative average
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.tanh(self.bn1(self.conv1(x)))
        x = torch.tanh(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def _bn_model_and_data(seed=0):
    torch.manual_seed(seed)
    model = BNNet().double().train()
    with torch.no_grad():  # non-trivial statistics to start from
        for mod in (model.bn1, model.bn2):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
            mod.num_batches_tracked.fill_(3)
            mod.weight.uniform_(0.5, 1.5)
            mod.bias.uniform_(-0.2, 0.2)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=g)
    return model, x, y


def _bn_groups(model, adaptive):
    norm_params = [p for mod in (model.bn1, model.bn2) for p in mod.parameters()]
    ids = {id(p) for p in norm_params}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [
        dict(params=rest, rho=0.1, adaptive=adaptive, eta=0.01),
        dict(params=norm_params, rho=0.05, adaptive=False, eta=0.0),  # ASAM authors' choice
    ]


@pytest.mark.parametrize("vectorize", VECTORIZE)
@pytest.mark.parametrize("m", [1, 4, B])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_batchnorm_model_matches_autograd_reference(adaptive, m, vectorize):
    model, x, y = _bn_model_and_data()
    groups = _bn_groups(model, adaptive)
    ref_groups = [(g["params"], g["rho"], g["adaptive"], g["eta"]) for g in groups]
    chunks = [(x[c * m:(c + 1) * m], y[c * m:(c + 1) * m]) for c in range(B // m)]
    G, loss, ploss, norm, stats = msref.torch_autograd(model, _ce_loss, chunks, ref_groups)
    before = [p.detach().clone() for p in model.parameters()]
    opt = _sam(groups)
    out = sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=m, vectorize=vectorize)
    for p, g in zip(model.parameters(), G, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(out, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.perturbed_loss, ploss, rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-12, atol=0)
    # Running statistics: once per step, the mean over chunks of each chunk's clean update;
    # never from the perturbed passes; num_batches_tracked + 1.
    for name, buf in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(buf) == 4, name
        else:
            torch.testing.assert_close(buf, stats[name], rtol=1e-12, atol=1e-15)
    # The weights took one SGD step (momentum buffer = G + wd w) from w.
    for p, w, g in zip(model.parameters(), before, G, strict=True):
        torch.testing.assert_close(p.detach(), w - LR * (g + WD * w), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM-ON", "ASAM-ON"])
def test_samon_matches_autograd_reference(adaptive, vectorize):
    """SAM-ON: each chunk perturbs the normalization parameters with its own gradient."""
    model, x, y = _bn_model_and_data()
    opt = sam_torch.SAMON(
        model.parameters(), torch.optim.SGD, rho=0.2, adaptive=adaptive, norm_params=model,
        lr=LR, momentum=MOMENTUM, weight_decay=WD,
    )
    norm_params = sam_torch.normalization_parameters(model)
    chunks = [(x[c * 4:(c + 1) * 4], y[c * 4:(c + 1) * 4]) for c in range(B // 4)]
    G, _, ploss, norm, _ = msref.torch_autograd(
        model, _ce_loss, chunks, [(norm_params, 0.2, adaptive, 0.01)]
    )
    sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=4, vectorize=vectorize)
    for p, g in zip(model.parameters(), G, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(opt.perturbed_loss, ploss, rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-12, atol=0)
    assert float(opt.sharpness) != 0.0


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_vectorized_equals_loop(chunk_size):
    """Two steps on the BN net, ASAM, m = 2 (k = 8): chunk_size bounds memory, not numbers."""
    results = []
    for vectorize in (False, True):
        model, x, y = _bn_model_and_data()
        opt = _sam(_bn_groups(model, True))
        for _ in range(2):
            sam_torch.m_sharpness_step(
                opt, model, _ce_loss, (x, y), m=2, vectorize=vectorize, chunk_size=chunk_size
            )
        results.append((model.state_dict(), opt.state_dict()["state"], opt.grad_norm, opt.loss))
    (sd_a, st_a, n_a, l_a), (sd_b, st_b, n_b, l_b) = results
    for name in sd_a:
        torch.testing.assert_close(sd_a[name], sd_b[name], rtol=1e-12, atol=1e-15)
    for i in st_a:
        torch.testing.assert_close(st_a[i]["momentum_buffer"], st_b[i]["momentum_buffer"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(n_a, n_b, rtol=1e-12, atol=0)
    torch.testing.assert_close(l_a, l_b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "bn"])
def test_m_equals_batch_is_step_closure(kind, vectorize):
    def build():
        if kind == "mlp":
            model = _mlp_from_numpy(ref.init_mlp())
            x, t = (torch.from_numpy(a) for a in ref.make_batches(1, n=B)[0])
            return model, _sam(_mlp_groups(model, True)), (x, t), _mse_loss
        model, x, y = _bn_model_and_data()
        return model, _sam(_bn_groups(model, True)), (x, y), _ce_loss

    model_a, opt_a, batch, loss_fn = build()
    model_b, opt_b, _, _ = build()
    for _ in range(3):
        sam_torch.m_sharpness_step(opt_a, model_a, loss_fn, batch, m=B, vectorize=vectorize)
        calls: list[int] = []

        def closure(calls=calls):
            opt_b.zero_grad()
            with sam_torch.disable_running_stats(model_b) if calls else _nothing():
                loss = loss_fn(model_b, batch)
            calls.append(1)
            loss.backward()
            return loss

        opt_b.step(closure)
    tol = dict(rtol=1e-13, atol=1e-15)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=name)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, **tol)
        torch.testing.assert_close(
            opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"], **tol
        )
    for attr in ("loss", "perturbed_loss", "grad_norm", "sharpness"):
        torch.testing.assert_close(getattr(opt_a, attr), getattr(opt_b, attr), **tol)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class Boom(Exception):
    pass


@pytest.mark.parametrize("storage", ["swap", "copy"])
@pytest.mark.parametrize("where", ["clean", "perturbed"])
def test_exception_on_third_chunk_leaves_w_bit_exact(where, storage):
    model, x, y = _bn_model_and_data()
    opt = _sam(_bn_groups(model, True), storage=storage)
    sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=4, vectorize=False)  # state
    weights = [p.detach().clone() for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    state = copy.deepcopy(opt.state_dict())
    fail_at = 5 if where == "clean" else 6  # calls: clean c0, pert c0, clean c1, pert c1, ...
    calls = []

    def loss_fn(model, chunk):
        calls.append(1)
        if len(calls) == fail_at:
            raise Boom("third chunk")
        return _ce_loss(model, chunk)

    with pytest.raises(Boom):
        sam_torch.m_sharpness_step(opt, model, loss_fn, (x, y), m=4, vectorize=False)
    assert len(calls) == fail_at
    assert not opt.is_perturbed
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    after = opt.state_dict()
    for i, s in state["state"].items():
        assert torch.equal(after["state"][i]["momentum_buffer"], s["momentum_buffer"])
    # and the optimizer still works
    sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=4, vectorize=False)


def test_exception_in_vectorized_path_changes_nothing():
    model, x, y = _bn_model_and_data()
    opt = _sam(_bn_groups(model, False))
    weights = [p.detach().clone() for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    calls = []

    def loss_fn(model, chunk):
        calls.append(1)
        if len(calls) == 2:  # the perturbed pass (traced once for all chunks)
            raise Boom("perturbed pass")
        return _ce_loss(model, chunk)

    with pytest.raises(Boom):
        sam_torch.m_sharpness_step(opt, model, loss_fn, (x, y), m=4, vectorize=True)
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert not opt.state


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("policy", ["clean", "both"])
def test_nonfinite_chunk_skips_the_step(policy, vectorize):
    model, x, y = _bn_model_and_data()
    opt = _sam(_bn_groups(model, False), skip_nonfinite=policy)
    sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=4, vectorize=vectorize)
    weights = [p.detach().clone() for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x_bad = x.clone()
    x_bad[9, 0, 2, 2] = float("nan")  # chunk 2 of 4
    sam_torch.m_sharpness_step(opt, model, _ce_loss, (x_bad, y), m=4, vectorize=vectorize)
    assert opt.step_skipped and not opt.is_perturbed
    for p, w, mb in zip(model.parameters(), weights, momentum, strict=True):
        assert torch.equal(p.detach(), w)
        assert torch.equal(opt.state[p]["momentum_buffer"], mb)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=4, vectorize=vectorize)
    assert not opt.step_skipped


@pytest.mark.parametrize("vectorize", [False, True])
def test_skipped_steps_count_towards_max_consecutive_skips(vectorize):
    """A skipped m-SAM step counts as step(closure)'s does; a step taken resets the count."""
    model, x, y = _bn_model_and_data()
    opt = _sam(_bn_groups(model, False), max_consecutive_skips=2)
    x_bad = x.clone()
    x_bad[9, 0, 2, 2] = float("nan")  # chunk 2 of 4
    step = functools.partial(sam_torch.m_sharpness_step, opt, model, _ce_loss, m=4,
                             vectorize=vectorize)
    assert opt.consecutive_skips == 0
    step((x_bad, y))
    step((x_bad, y))
    assert opt.step_skipped and opt.consecutive_skips == 2
    step((x, y))
    assert not opt.step_skipped and opt.consecutive_skips == 0
    step((x_bad, y))
    step((x_bad, y))
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"3 consecutive SAM steps were skipped.*"
                                           r"max_consecutive_skips=2"):
        step((x_bad, y))
    assert opt.consecutive_skips == 3 and opt.step_skipped and not opt.is_perturbed
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)  # the last finite weights
    assert torch.isnan(opt.loss)  # the figures of the step are set before it raises


def test_skip_nonfinite_false_lets_nan_through():
    model, x, y = _bn_model_and_data()
    opt = _sam(_bn_groups(model, False), skip_nonfinite=False)
    x_bad = x.clone()
    x_bad[9, 0, 2, 2] = float("nan")
    sam_torch.m_sharpness_step(opt, model, _ce_loss, (x_bad, y), m=4, vectorize=False)
    assert not opt.step_skipped
    assert not torch.isfinite(model.conv1.weight).all()


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@pytest.mark.parametrize("vectorize", [False, True])
def test_batch_structures(vectorize):
    """A tensor, a tuple, a list, a NamedTuple and a dict give the same step; chunks keep the type."""
    model0, x, y = _bn_model_and_data()
    xy = torch.cat([x.flatten(1), y[:, None].double()], 1)  # one tensor holding both
    forms = {
        "tensor": (xy, lambda mod, c: _ce_loss(mod, (c[:, :-1].view(-1, 2, 6, 6), c[:, -1].long()))),
        "tuple": ((x, y), _ce_loss),
        "list": ([x, y], lambda mod, c: (isinstance(c, list) or _fail()) and _ce_loss(mod, c)),
        "namedtuple": (Pair(x, y), lambda mod, c: (isinstance(c, Pair) or _fail()) and _ce_loss(mod, (c.x, c.y))),
        "dict": ({"x": x, "y": y}, lambda mod, c: _ce_loss(mod, (c["x"], c["y"]))),
    }
    results = {}
    for name, (batch, loss_fn) in forms.items():
        model = copy.deepcopy(model0)
        opt = _sam(_bn_groups(model, False))
        sam_torch.m_sharpness_step(opt, model, loss_fn, batch, m=4, vectorize=vectorize)
        results[name] = [p.detach() for p in model.parameters()]
    for name, ps in results.items():
        for a, b in zip(ps, results["tuple"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15, msg=name)


def _fail():
    raise AssertionError("the chunk does not have the batch's type")


def test_bad_m_and_batches_raise():
    model, x, y = _bn_model_and_data()
    opt = _sam(model.parameters())
    with pytest.raises(ValueError, match=r"B=16 .*m=5.*\[1, 2, 4, 8, 16\]"):
        sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=5)
    with pytest.raises(ValueError, match=r"m must be an int >= 1, got 0"):
        sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=0)
    with pytest.raises(TypeError, match=r"m must be an int"):
        sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=4.0)
    with pytest.raises(ValueError, match=r"leading dimension.*16 rows.*8"):
        sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y[:8]), m=4)
    with pytest.raises(TypeError, match=r"batch\[1\] is a str"):
        sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, "labels"), m=4)
    with pytest.raises(ValueError, match=r"vectorize must be"):
        sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=4, vectorize="yes")
    with pytest.raises(ValueError, match=r"0-d tensor"):
        sam_torch.m_sharpness_step(opt, model, lambda mod, c: mod(c[0]).sum(1), (x, y), m=4)
    assert not opt.state  # nothing ran


@pytest.mark.parametrize(
    "cls,kw",
    [
        (sam_torch.GSAM, {}),
        (sam_torch.WSAM, {}),
        (sam_torch.FriendlySAM, {}),
        (sam_torch.LookSAM, {}),
        # MomentumSAM needs a base optimizer with momentum (momentum=0 is refused at construction)
        (sam_torch.MomentumSAM, {"momentum": 0.9}),
    ],
)
def test_variants_without_a_definition_raise(cls, kw):
    model, x, y = _bn_model_and_data()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, **kw)
    with pytest.raises(TypeError, match=cls.__name__):
        sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=4)


def test_not_a_sam_raises():
    model, x, y = _bn_model_and_data()
    with pytest.raises(TypeError, match=r"needs a sam_torch\.SAM"):
        sam_torch.m_sharpness_step(torch.optim.SGD(model.parameters(), lr=0.1), model, _ce_loss, (x, y), m=4)
    opt = _sam(model.parameters())
    scaled = sam_torch.ScaledSAM(opt, torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="ScaledSAM"):
        sam_torch.m_sharpness_step(scaled, model, _ce_loss, (x, y), m=4)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.func.vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return self.lin(-x)


def test_auto_falls_back_to_the_loop_once_with_a_reason(monkeypatch):
    monkeypatch.setitem(_msharpness._AUTO_VECTORIZE, "cpu", True)
    torch.manual_seed(0)
    model = Branchy().double()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    opt = _sam(model.parameters())
    with pytest.warns(RuntimeWarning, match="data-dependent control flow"):
        sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=2, vectorize="auto")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=2, vectorize="auto")
    ref_opt = _sam(reference.parameters())
    for _ in range(2):
        sam_torch.m_sharpness_step(ref_opt, reference, _ce_loss, (x, y), m=2, vectorize=False)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"vectorize=True.*data-dependent control flow"):
        sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=2, vectorize=True)
    with pytest.raises(ValueError, match="not a parameter of model"):
        sam_torch.m_sharpness_step(opt, Branchy().double(), _ce_loss, (x, y), m=2, vectorize=True)


def test_auto_takes_the_measured_path_on_cpu(monkeypatch):
    """On CPU "auto" runs the vectorized path (benchmarks/results/m-sharpness/)."""
    calls = []
    real = _msharpness._vectorized_step

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_msharpness, "_vectorized_step", spy)
    model, x, y = _bn_model_and_data()
    opt = _sam(_bn_groups(model, False))
    sam_torch.m_sharpness_step(opt, model, _ce_loss, (x, y), m=4)
    assert calls == [1]
