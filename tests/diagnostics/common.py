"""Shared pieces of the diagnostics tests: small float64 problems and their exact Hessians.

The exact reference is built without the code under test: the full Hessian of the torch
network column by column from autograd, then ``numpy.linalg.eigvalsh``. The Flax twin holds
the same weights in another order and layout (a permutation of the coordinates), so its
Hessian has the same eigenvalues and trace.
"""

from __future__ import annotations

from typing import Any

import numpy as np

B = 12  # examples per problem


def classification_data(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs in torch layout (N, 5) or (N, 1, 5, 5) and integer labels in [0, 3)."""
    rng = np.random.default_rng(seed)
    shape = (B, 5) if kind == "mlp" else (B, 1, 5, 5)
    return rng.standard_normal(shape), rng.integers(0, 3, size=B)


def torch_tiny_convnet(seed: int = 0) -> Any:
    """conv3x3(1->2) tanh conv3x3/2(2->3) tanh global-mean Linear(3->3): 89 parameters."""
    import torch
    from torch import nn

    class TinyConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
            self.conv2 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
            self.head = nn.Linear(3, 3)

        def forward(self, x: Any) -> Any:
            x = torch.tanh(self.conv1(x))
            x = torch.tanh(self.conv2(x))
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(seed)
    return TinyConvNet().double()


def flax_tiny_convnet() -> Any:
    """The Flax twin of :func:`torch_tiny_convnet` (NHWC)."""
    import flax.linen as nn

    class TinyConvNet(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            kw = dict(param_dtype=x.dtype, dtype=x.dtype)
            x = nn.tanh(nn.Conv(2, (3, 3), padding=((1, 1), (1, 1)), name="conv1", **kw)(x))
            x = nn.tanh(nn.Conv(3, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv2", **kw)(x))
            return nn.Dense(3, name="head", **kw)(x.mean(axis=(1, 2)))

    return TinyConvNet()


def torch_problem(kind: str, seed: int = 0) -> tuple[Any, Any, tuple[Any, Any]]:
    """``(model, loss_fn, (x, y))`` in float64: the helpers' tanh MLP or conv net, mean CE."""
    import torch
    import torch.nn.functional as F

    from tests import helpers

    model = helpers.torch_mlp(seed=seed) if kind == "mlp" else torch_tiny_convnet(seed=seed)
    x, y = classification_data(kind, seed)

    def loss_fn(model: Any, batch: Any) -> Any:
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets)

    return model, loss_fn, (torch.tensor(x), torch.tensor(y))


def torch_exact_hessian(model: Any, loss_fn: Any, batch: Any) -> np.ndarray:
    """The Hessian of ``loss_fn(model, batch)`` over the trainable parameters, column by column."""
    import torch
    from torch.func import functional_call

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.reshape(-1) for p in params]).clone().requires_grad_(True)
    pieces, start = [], 0
    for p in params:
        pieces.append(flat[start:start + p.numel()].view_as(p))
        start += p.numel()

    class Bound(torch.nn.Module):
        def forward(self, inputs: Any) -> Any:
            return functional_call(model, dict(zip(names, pieces, strict=True)), (inputs,))

    def model_at(inputs: Any) -> Any:
        return Bound()(inputs)

    loss = loss_fn(model_at, batch)
    (grad,) = torch.autograd.grad(loss, flat, create_graph=True)
    columns = [torch.autograd.grad(grad[i], flat, retain_graph=True)[0] for i in range(flat.numel())]
    hessian = torch.stack(columns, dim=1).detach().numpy()
    return (hessian + hessian.T) / 2


def jax_problem(kind: str, seed: int = 0) -> tuple[Any, Any, tuple[Any, Any], Any]:
    """``(loss_fn, params, (x, y), torch_model)``: the Flax twin with the torch weights."""
    import jax.numpy as jnp
    import optax

    from tests import helpers

    model, _, _ = torch_problem(kind, seed)
    x, y = classification_data(kind, seed)
    if kind == "mlp":
        net, variables = helpers.flax_mlp(), helpers.mlp_params_from_torch(model)
    else:
        # Same module names and layouts as the helpers' conv net: its converter applies.
        net, variables = flax_tiny_convnet(), helpers.convnet_params_from_torch(model)
        x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC

    def loss_fn(params: Any, batch: Any) -> Any:
        inputs, targets = batch
        logits = net.apply({"params": params}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return loss_fn, variables["params"], (jnp.asarray(x), jnp.asarray(y)), model


def top(eigenvalues: np.ndarray, k: int) -> np.ndarray:
    return np.sort(eigenvalues)[::-1][:k]


def rel(a: Any, b: Any) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def to_torch_layout(kind: str, tree: Any) -> list[np.ndarray]:
    """A pytree shaped like the Flax params as arrays in torch ``parameters()`` order/layout."""
    from tests import helpers

    variables = {"params": tree}
    if kind == "mlp":
        return helpers.mlp_params_to_torch_layout(variables)
    return helpers.convnet_params_to_torch_layout(variables)
