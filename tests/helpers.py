"""Small shared test helpers: the same tiny networks in torch and Flax, with weights copied across.

Both networks use ``tanh`` (no kinks, so float64 trajectories agree to the last digits) and
global average pooling in the conv net (no NCHW/NHWC flatten-order question).

Import the torch or the JAX parts lazily: a test module that only needs one backend must not
pay for importing the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------
# torch side
# ---------------------------------------------------------------------------------------


def torch_mlp(d: int = 5, h: int = 7, o: int = 3, *, seed: int = 0, dtype: Any = None) -> Any:
    """``Sequential(Linear(d, h), Tanh(), Linear(h, o))`` with seeded weights."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, o))
    return model.to(dtype or torch.float64)


def torch_convnet(c: int = 2, o: int = 3, *, seed: int = 0, dtype: Any = None) -> Any:
    """conv3x3(c->4) tanh conv3x3/2(4->6) tanh global-mean Linear(6->o), NCHW input."""
    import torch
    from torch import nn

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
            self.head = nn.Linear(6, o)

        def forward(self, x: Any) -> Any:
            x = torch.tanh(self.conv1(x))
            x = torch.tanh(self.conv2(x))
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(seed)
    return ConvNet().to(dtype or torch.float64)


# ---------------------------------------------------------------------------------------
# Flax side (same architectures, parameters converted from the torch models)
# ---------------------------------------------------------------------------------------


def flax_mlp(h: int = 7, o: int = 3) -> Any:
    """The Flax linen twin of :func:`torch_mlp`."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.tanh(nn.Dense(h, param_dtype=x.dtype, dtype=x.dtype, name="fc1")(x))
            return nn.Dense(o, param_dtype=x.dtype, dtype=x.dtype, name="fc2")(x)

    return MLP()


def flax_convnet(o: int = 3) -> Any:
    """The Flax linen twin of :func:`torch_convnet`, NHWC input."""
    import flax.linen as nn

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            kw = dict(param_dtype=x.dtype, dtype=x.dtype)
            x = nn.tanh(nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), name="conv1", **kw)(x))
            x = nn.tanh(
                nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv2", **kw)(x)
            )
            return nn.Dense(o, name="head", **kw)(x.mean(axis=(1, 2)))

    return ConvNet()


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def mlp_params_from_torch(model: Any) -> dict[str, Any]:
    """Flax params of :func:`flax_mlp` holding the weights of a :func:`torch_mlp`."""
    import jax.numpy as jnp

    fc1, fc2 = model[0], model[2]
    return {
        "params": {
            "fc1": {"kernel": jnp.asarray(_np(fc1.weight).T), "bias": jnp.asarray(_np(fc1.bias))},
            "fc2": {"kernel": jnp.asarray(_np(fc2.weight).T), "bias": jnp.asarray(_np(fc2.bias))},
        }
    }


def mlp_params_to_torch_layout(variables: dict[str, Any]) -> list[np.ndarray]:
    """Flax MLP params as NumPy arrays in ``torch_mlp.parameters()`` order and layout."""
    p = variables["params"]
    return [
        np.asarray(p["fc1"]["kernel"]).T,
        np.asarray(p["fc1"]["bias"]),
        np.asarray(p["fc2"]["kernel"]).T,
        np.asarray(p["fc2"]["bias"]),
    ]


def convnet_params_from_torch(model: Any) -> dict[str, Any]:
    """Flax params of :func:`flax_convnet` holding the weights of a :func:`torch_convnet`."""
    import jax.numpy as jnp

    def conv(m: Any) -> dict[str, Any]:  # OIHW -> HWIO
        return {
            "kernel": jnp.asarray(_np(m.weight).transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(_np(m.bias)),
        }

    return {
        "params": {
            "conv1": conv(model.conv1),
            "conv2": conv(model.conv2),
            "head": {
                "kernel": jnp.asarray(_np(model.head.weight).T),
                "bias": jnp.asarray(_np(model.head.bias)),
            },
        }
    }


def convnet_params_to_torch_layout(variables: dict[str, Any]) -> list[np.ndarray]:
    """Flax conv-net params in ``torch_convnet.parameters()`` order and layout."""
    p = variables["params"]
    out = []
    for name in ("conv1", "conv2"):
        out.append(np.asarray(p[name]["kernel"]).transpose(3, 2, 0, 1))
        out.append(np.asarray(p[name]["bias"]))
    out.append(np.asarray(p["head"]["kernel"]).T)
    out.append(np.asarray(p["head"]["bias"]))
    return out


@contextlib.contextmanager
def jax_x64() -> Iterator[None]:
    """Enable JAX float64 inside the block only (no leak into other tests)."""
    import jax

    with jax.enable_x64(True):
        yield


def max_rel_diff(a: Any, b: Any) -> float:
    """Largest per-tensor ``max|a - b| / max|b|`` over two lists of arrays, in float64."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        if x.shape != y.shape:
            raise ValueError(f"shape mismatch {x.shape} vs {y.shape}")
        if x.size:
            scale = max(float(np.max(np.abs(y))), 1e-300)
            worst = max(worst, float(np.max(np.abs(x - y))) / scale)
    return worst


def conv_jit(fun: Any, **kwargs: Any) -> Any:
    """``jax.jit`` with XLA's CPU backend at optimization level 1 for this program only.

    The test processes compile at level 0 (tests/conftest.py), which suits their tiny
    programs; but at level 0 XLA:CPU emits float64 convolutions as unoptimized loops, ~15x
    slower than at level 1, so the float64 WideResNet programs compile this way instead."""
    import jax

    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 1}, **kwargs)
