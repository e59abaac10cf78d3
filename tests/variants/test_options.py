"""The shared constructor options: declared once (SAMOptions), taken by every SAM-family class."""

from __future__ import annotations

import inspect
import typing

import pytest

torch = pytest.importorskip("torch")

import sam_torch  # noqa: E402
from sam_torch import MomentumSAMOptions, SAMOptions  # noqa: E402

VARIANTS = {
    "GSAM": {"alpha"},
    "WSAM": {"gamma", "decouple"},
    "SAMON": {"norm_params"},
    "FriendlySAM": {"sigma", "lmbda"},
    "VaSSO": {"theta"},
    "LookSAM": {"k", "alpha"},
    "EveryKSAM": {"k"},
    "MomentumSAM": {"rho"},
}


def _sam_options() -> set[str]:
    params = inspect.signature(sam_torch.SAM.__init__).parameters
    return {
        name
        for name, p in params.items()
        if name not in ("self", "params", "base_optimizer") and p.kind is not p.VAR_KEYWORD
    }


def test_sam_options_are_exactly_sams_constructor_arguments() -> None:
    assert set(SAMOptions.__optional_keys__) == _sam_options()
    assert not SAMOptions.__required_keys__
    assert set(MomentumSAMOptions.__optional_keys__) == _sam_options() - {"rho", "adaptive", "eta"}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_declares_only_its_own_keyword_only_arguments(name: str) -> None:
    cls = getattr(sam_torch, name)
    params = inspect.signature(cls.__init__).parameters
    own = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert own == VARIANTS[name]
    positional = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == ["self", "params", "base_optimizer"]
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    options = typing.get_args(hints[next(reversed(params))])[0]
    assert options is (MomentumSAMOptions if name == "MomentumSAM" else SAMOptions)
    for arg in VARIANTS[name]:
        assert arg in hints, f"{name}({arg}=) has no type"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_forwards_the_shared_options_to_sam(name: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    extra = {"norm_params": model} if name == "SAMON" else {}
    neighbourhood = {} if name == "MomentumSAM" else {"rho": 0.07, "adaptive": True, "eta": 0.02}
    opt = getattr(sam_torch, name)(
        model.parameters(),
        torch.optim.SGD,
        sam_eps=1e-9,
        model=model,
        perturb_impl="foreach",
        storage="copy",
        skip_nonfinite=False,
        max_consecutive_skips=3,
        lr=0.1,
        momentum=0.9,
        **neighbourhood,
        **extra,
    )
    group = opt.param_groups[0]
    assert group["sam_eps"] == 1e-9 and group["lr"] == 0.1 and group["momentum"] == 0.9
    assert group["rho"] == (0.3 if name == "MomentumSAM" else 0.07)
    if name != "MomentumSAM":
        assert group["adaptive"] is True and group["eta"] == 0.02
    assert opt.model is model and opt.skip_nonfinite is False and opt.max_consecutive_skips == 3
    assert opt._storage_choice == "copy" and opt._perturb_impl == "foreach"


def test_positional_shared_options_are_refused_with_a_type_error() -> None:
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(TypeError):
        sam_torch.GSAM(p, torch.optim.SGD, 0.05)  # type: ignore[misc]
