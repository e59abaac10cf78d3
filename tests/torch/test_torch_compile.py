"""SAM's calls under ``torch.compile`` give eager's numbers (eager, aot_eager and inductor backends).

The optimizer's entry points are graph breaks by design (``torch.compiler.disable``): they
run eagerly wherever a compiled function calls them, so compiling ``opt.step``,
``opt.first_step`` / ``second_step`` / ``restore``, ``m_sharpness_step`` or ``ScaledSAM``'s
calls must give eager's weights bit for bit and leave no step half done. A user's whole
compiled train step (the model's forward and backward compiled around SAM's calls) must
match eager to the rounding of the compiled model (float64 here).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import sam_torch

BACKENDS = ["eager", "aot_eager", "inductor"]
LR = dict(lr=0.1, momentum=0.9)


def _model() -> nn.Module:
    torch.manual_seed(0)
    # LayerNorm: SAMON's normalization parameters
    return nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 2)).double()


FACTORIES = {
    "SAM": lambda m: sam_torch.SAM(m.parameters(), torch.optim.SGD, rho=0.05, **LR),
    "ASAM": lambda m: sam_torch.SAM(m.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, **LR),
    "ASAM-foreach": lambda m: sam_torch.SAM(
        m.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, perturb_impl="foreach", **LR
    ),
    "SAM-copy": lambda m: sam_torch.SAM(m.parameters(), torch.optim.SGD, storage="copy", **LR),
    "GSAM": lambda m: sam_torch.GSAM(m.parameters(), torch.optim.SGD, alpha=0.2, **LR),
    "WSAM": lambda m: sam_torch.WSAM(m.parameters(), torch.optim.SGD, gamma=0.88, **LR),
    "SAMON": lambda m: sam_torch.SAMON(m.parameters(), torch.optim.SGD, norm_params=m, **LR),
    "FriendlySAM": lambda m: sam_torch.FriendlySAM(m.parameters(), torch.optim.SGD, **LR),
    "VaSSO": lambda m: sam_torch.VaSSO(m.parameters(), torch.optim.SGD, theta=0.9, **LR),
    "LookSAM": lambda m: sam_torch.LookSAM(m.parameters(), torch.optim.SGD, k=2, **LR),
    "EveryKSAM": lambda m: sam_torch.EveryKSAM(m.parameters(), torch.optim.SGD, k=2, **LR),
    "MomentumSAM": lambda m: sam_torch.MomentumSAM(m.parameters(), torch.optim.SGD, **LR),
}

_G = torch.Generator().manual_seed(1)
BATCHES = [
    (torch.randn(8, 10, generator=_G, dtype=torch.float64),
     torch.randn(8, 2, generator=_G, dtype=torch.float64))
    for _ in range(3)
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_equal(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e), (a - e).abs().max()


def _run(name, api, compile_fn):
    """Three steps of optimizer ``name`` through ``api``, each entry point passed to ``compile_fn``."""
    model = _model()
    opt = FACTORIES[name](model)
    step = compile_fn(opt.step)
    first_step, second_step = compile_fn(opt.first_step), compile_fn(opt.second_step)
    for batch in BATCHES:
        if api == "closure":
            def closure(batch=batch):
                loss = _loss(model, batch)
                loss.backward()
                return loss

            step(closure)
        elif name == "MomentumSAM":  # perturbs along the momentum, before its one backward
            first_step()
            _loss(model, batch).backward()
            second_step(zero_grad=True)
        else:
            _loss(model, batch).backward()
            first_step(zero_grad=True)
            _loss(model, batch).backward()
            second_step(zero_grad=True)
        assert not opt.is_perturbed
    # The case: a compiled first_step, then restore, must give w back exactly.
    w = _weights(model)
    _loss(model, BATCHES[0]).backward()
    first_step()
    perturbed = _weights(model)
    assert opt.is_perturbed
    compile_fn(opt.restore)()
    assert not opt.is_perturbed
    _assert_equal(_weights(model), w)
    return w, perturbed, opt


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_optimizer_calls_give_eager_weights(backend, name):
    counter = CompileCounterWithBackend(backend)
    for api in ("closure", "two_step"):
        w_eager, pert_eager, opt_eager = _run(name, api, lambda f: f)
        w, pert, opt = _run(name, api, lambda f: torch.compile(f, backend=counter))
        _assert_equal(w, w_eager)
        _assert_equal(pert, pert_eager)  # the same w + e, so the same perturbation
        assert opt.step_skipped == opt_eager.step_skipped
        assert opt.loss is None if opt_eager.loss is None else torch.equal(opt.loss, opt_eager.loss)
    assert counter.frame_count == 0  # one graph break per entry point: nothing traced


def _train_steps(train_step, model, opt):
    for batch in BATCHES:
        train_step(model, opt, batch)
        assert not opt.is_perturbed
    return _weights(model)


def _two_step_train_step(model, opt, batch):
    _loss(model, batch).backward()
    opt.first_step(zero_grad=True)
    _loss(model, batch).backward()
    opt.second_step(zero_grad=True)


def _perturbed_block_train_step(model, opt, batch):
    _loss(model, batch).backward()
    with opt.perturbed():
        _loss(model, batch).backward()


def _closure_train_step(model, opt, batch):
    def closure():
        loss = _loss(model, batch)
        loss.backward()
        return loss

    return opt.step(closure)


_TRAIN_STEP_CASES = [
    (backend, train_step, name)
    for backend in ("eager", "aot_eager")
    for train_step in (_two_step_train_step, _perturbed_block_train_step, _closure_train_step)
    for name in ("SAM", "ASAM", "GSAM")
] + [  # inductor compiles the model: slow on CPU, one optimizer is enough
    pytest.param("inductor", train_step, "ASAM", marks=pytest.mark.slow)
    for train_step in (_two_step_train_step, _closure_train_step)
]


@pytest.mark.parametrize(("backend", "train_step", "name"), _TRAIN_STEP_CASES)
def test_a_compiled_train_step_calling_both_passes_matches_eager(backend, train_step, name):
    model = _model()
    expected = _train_steps(train_step, model, FACTORIES[name](model))
    model = _model()
    opt = FACTORIES[name](model)
    got = _train_steps(torch.compile(train_step, backend=backend), model, opt)
    # The model's forward and backward are compiled (inductor fuses and reorders them), SAM's
    # calls are eager: the same weights to the rounding of the compiled model, in float64.
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_m_sharpness_step_and_scaled_sam_give_eager_weights(backend):
    batch = (torch.cat([b[0] for b in BATCHES]), torch.cat([b[1] for b in BATCHES]))
    runs = {}
    counter = CompileCounterWithBackend(backend)
    for mode in ("eager", "compiled"):
        def wrap(f, mode=mode):
            return f if mode == "eager" else torch.compile(f, backend=counter)

        model = _model()
        opt = FACTORIES["ASAM"](model)
        step = wrap(sam_torch.m_sharpness_step)
        for vectorize in (False, True):
            step(opt, model, _loss, batch, m=6, vectorize=vectorize)
        model32 = _model().float()
        amp = sam_torch.ScaledSAM(
            sam_torch.SAM(model32.parameters(), torch.optim.SGD, rho=0.05, **LR),
            torch.amp.GradScaler("cpu", init_scale=2.0**10),
        )
        x, y = batch[0].float(), batch[1].float()

        def closure(model32=model32, x=x, y=y, amp=amp):
            loss = F.mse_loss(model32(x), y)
            amp.scale(loss).backward()
            return loss

        wrap(amp.step)(closure)
        F.mse_loss(model32(x), y).backward()  # ScaledSAM's two-step API (scale 1 is fine here)
        wrap(amp.first_step)(zero_grad=True)
        amp.scale(F.mse_loss(model32(x), y)).backward()
        wrap(amp.second_step)(zero_grad=True)
        assert not opt.is_perturbed and not amp.optimizer.is_perturbed
        runs[mode] = _weights(model) + _weights(model32)
    _assert_equal(runs["compiled"], runs["eager"])
    assert counter.frame_count == 0


@pytest.mark.slow
def test_perturb_impl_compiled_keeps_its_kernels_inside_a_compiled_call(recwarn):
    results = {}
    for mode in ("eager", "compiled"):
        model = _model()
        opt = sam_torch.SAM(
            model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, perturb_impl="compiled", **LR
        )
        first_step = opt.first_step if mode == "eager" else torch.compile(opt.first_step, backend="eager")
        w = _weights(model)
        _loss(model, BATCHES[0]).backward()
        first_step()
        results[mode] = _weights(model)
        assert opt._compiled not in (None, False)  # sam_torch's own kernels were compiled
        opt.restore()
        _assert_equal(_weights(model), w)
    _assert_equal(results["compiled"], results["eager"])
    assert not [w for w in recwarn if "perturb_impl='compiled'" in str(w.message)]


def test_entry_points_keep_their_signatures_and_docstrings():
    import inspect

    assert list(inspect.signature(sam_torch.SAM.step).parameters) == ["self", "closure"]
    assert list(inspect.signature(sam_torch.GSAM.first_step).parameters) == [
        "self", "zero_grad", "loss"
    ]
    assert "m-sharpness" in (sam_torch.m_sharpness_step.__doc__ or "")


_FRESH_PROCESS = """
import sys
import torch
import torch.nn.functional as F
from torch import nn

import sam_torch

# the entry points' graph breaks are made on first use: importing costs no compiler
assert "torch._dynamo" not in sys.modules, "import sam_torch loaded torch._dynamo"


def run(backend, cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 10, generator=gen, dtype=torch.float64),
             torch.randn(8, 2, generator=gen, dtype=torch.float64)) for _ in range(3)]

    def train_step(x, y):
        F.mse_loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.mse_loss(model(x), y).backward()
        opt.second_step(zero_grad=True)

    step = train_step if backend is None else torch.compile(train_step, backend=backend)
    for x, y in data:
        step(x, y)
    assert len(calls) == len(data) and not opt.is_perturbed
    return [p.detach().clone() for p in model.parameters()]


# the first call of each entry point ever made is a compiled one: still eager's weights
for cls in (sam_torch.SAM, sam_torch.GSAM):
    compiled, eager = run("aot_eager", cls), run(None, cls)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True)), cls.__name__
print("ok")
"""


def test_import_loads_no_compiler_and_a_first_call_under_compile_runs_eagerly():
    """``torch.compiler.disable`` imports ``torch._dynamo`` (seconds): the entry points make
    their graph breaks on first use. In a fresh process whose very first SAM calls are inside
    ``torch.compile``, the weights still equal eager's and the step hooks fire once a step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
