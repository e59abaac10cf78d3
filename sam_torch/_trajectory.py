r"""``sam_torch.SAF`` and ``sam_torch.MESA``: sharpness-aware training for free (Du et al., NeurIPS 2022).

Both wrap any base optimizer and add nothing to its update: the sharpness-aware part is a
term of the loss, :meth:`SAF.trajectory_loss` / :meth:`MESA.trajectory_loss`, that the
training loop adds to its own loss before ``backward()`` (the math is
:mod:`sam_core`'s ``trajectory_loss``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

import sam_core

from ._ops import TorchOps
from ._options import BaseOptimizer, Params

__all__ = ["MESA", "SAF"]


def _kl_trajectory(logits: Tensor, reference: Tensor, temperature: float, lmbda: float) -> Tensor:
    # In at least float32: the softmax of float16/bfloat16 logits loses the small
    # probabilities the divergence is made of.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return sam_core.trajectory_loss(
        logits.to(dtype),
        reference.detach().to(dtype),
        temperature=temperature,
        lmbda=lmbda,
        log_softmax=lambda x: torch.log_softmax(x, dim=-1),
        exp=torch.exp,
    )


def _check_epoch(epoch: Any) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(
            f"epoch must be the zero-based epoch as a Python int, got {type(epoch).__name__} {epoch!r}"
        )
    if epoch < 0:
        raise ValueError(f"epoch must be an int >= 0 (zero-based), got {epoch!r}")
    return epoch


def _check_logits(logits: Any) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        what = f"a tensor of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"logits must be the model's outputs of shape (batch, num_classes), got {what}; "
            "flatten extra axes first (e.g. logits.reshape(-1, num_classes) with the indices "
            "repeated to match)"
        )
    return logits


class _Trajectory(Optimizer):
    """A base optimizer wrapped: one set of param groups and state, plus the form's own buffers.

    ``state_dict()`` is the base optimizer's with the form's buffers under ``self._key``.
    """

    _key = ""

    def __init__(self, params: Params | nn.Module, base_optimizer: BaseOptimizer, base_kwargs: dict[str, Any]) -> None:
        if isinstance(base_optimizer, Optimizer) or not callable(base_optimizer):
            got = f"an instance of {type(base_optimizer).__name__}" if isinstance(base_optimizer, Optimizer) else repr(base_optimizer)
            raise TypeError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, got {got}; "
                f"pass the class and its keyword arguments: {type(self).__name__}(params, "
                "torch.optim.SGD, lr=0.1, momentum=0.9)"
            )
        if isinstance(params, Tensor):
            raise TypeError(
                f"params must be an iterable of tensors or of param-group dicts, got a single "
                f"tensor of shape {tuple(params.shape)}; wrap it in a list"
            )
        if isinstance(params, nn.Module):
            params = params.parameters()
        params = list(params)
        if not params:
            raise ValueError(
                f"params is empty: {type(self).__name__} got no parameters to optimize; pass "
                "model.parameters() of a model that has parameters, or a list of param groups"
            )
        super().__init__(params, dict(base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One set of groups and one state for both: schedulers, zero_grad, state_dict and
        # the base optimizer all see the same dicts.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "base_optimizer", None) is None:
            super().add_param_group(param_group)
        else:
            raise NotImplementedError(
                f"{type(self).__name__} keeps a buffer per parameter; build it with all the "
                "param groups instead of adding one later"
            )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """The base optimizer's step (``closure`` as it takes it: the closure adds the
        trajectory loss itself), then the form's bookkeeping."""
        if closure is not None:
            with torch.enable_grad():
                loss = self.base_optimizer.step(closure)
        else:
            loss = self.base_optimizer.step()
        self._after_step()
        return loss

    def _after_step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def _own_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_own_state(self, own: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        state = self.base_optimizer.state_dict()
        state[self._key] = self._own_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._key not in state_dict:
            raise KeyError(
                f"state_dict has no {self._key!r} entry: it was not saved by "
                f"{type(self).__name__}.state_dict() (a base optimizer's state_dict lacks the "
                f"{type(self).__name__} buffers); save and load the {type(self).__name__}'s own"
            )
        state_dict = dict(state_dict)
        own = state_dict.pop(self._key)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._load_own_state(own)


class SAF(_Trajectory):
    r"""Sharpness-Aware training for Free: the trajectory loss against the model's own outputs
    of :math:`\tilde E` epochs before, on top of any base optimizer.

    .. math::

        L = L_{\mathrm{CE}} + \lambda \tau^2 \frac{1}{B} \sum_i
        \mathrm{KL}\bigl(\sigma(z_i^{(e - \tilde E)} / \tau) \,\Vert\, \sigma(z_i / \tau)\bigr)
        \quad \text{for } E_{\mathrm{start}} < e,

    :math:`z_i` the outputs for training example :math:`i` now, :math:`z_i^{(e - \tilde E)}`
    those recorded when it was seen at epoch :math:`e - \tilde E` (:mod:`sam_core`'s
    ``trajectory_loss``, ``saf_slot``). It costs one forward-backward per step, as the base
    optimizer alone, and a memory of ``lag_epochs * num_examples * num_classes`` values
    (allocated at the first call, on the logits' device, in float32 or the logits' wider
    dtype). The data pipeline must hand out each example's index, each example at most once
    per epoch::

        opt = sam_torch.SAF(model.parameters(), torch.optim.SGD, num_examples=len(train_set),
                            lr=0.1, momentum=0.9)
        for epoch in range(epochs):
            for x, y, idx in loader:                      # idx: the examples' indices
                logits = model(x)
                loss = F.cross_entropy(logits, y) + opt.trajectory_loss(logits, idx, epoch)
                opt.zero_grad(); loss.backward(); opt.step()

    Reference: Du, Zhou, Feng, Tan and Zhou, "Sharpness-Aware Training for Free", NeurIPS
    2022. Defaults (official code, github.com/AngusDujw/SAF, and its README):
    ``lmbda=0.3``, ``temperature=5``, ``start_epoch=5``, ``lag_epochs=3``.

    Args:
        params: parameters, param groups, or the ``nn.Module`` itself.
        base_optimizer: the optimizer class (``torch.optim.SGD``, ``AdamW``, ...).
        num_examples: :math:`N`, the size of the training set (indices in ``[0, N)``).
        num_classes: :math:`C`; optional (taken from the first logits).
        lmbda: :math:`\lambda \ge 0`, the weight of the trajectory loss.
        temperature: :math:`\tau > 0`.
        start_epoch: :math:`E_{\mathrm{start}}`: the loss is on for zero-based epochs
            ``start_epoch < epoch`` (the official ``epoch > kl_start_epoch``).
        end_epoch: ``None``, or the loss is off again from this epoch on.
        lag_epochs: :math:`\tilde E \ge 1` (at most ``start_epoch + 1``).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ...).
    """

    _key = "saf"

    def __init__(
        self,
        params: Params | nn.Module,
        base_optimizer: BaseOptimizer,
        *,
        num_examples: int,
        num_classes: int | None = None,
        lmbda: float = sam_core.SAF_DEFAULTS["lmbda"],
        temperature: float = sam_core.SAF_DEFAULTS["temperature"],
        start_epoch: int = sam_core.SAF_DEFAULTS["start_epoch"],
        end_epoch: int | None = None,
        lag_epochs: int = sam_core.SAF_DEFAULTS["lag_epochs"],
        **base_kwargs: Any,
    ) -> None:
        sam_core.validate_saf(
            num_examples=num_examples, num_classes=num_classes, lmbda=lmbda, temperature=temperature,
            start_epoch=start_epoch, end_epoch=end_epoch, lag_epochs=lag_epochs,
        )
        super().__init__(params, base_optimizer, base_kwargs)
        self.num_examples = int(num_examples)
        self.num_classes = num_classes
        self.lmbda = float(lmbda)
        self.temperature = float(temperature)
        self.start_epoch = int(start_epoch)
        self.end_epoch = end_epoch
        self.lag_epochs = int(lag_epochs)
        #: ``(lag_epochs, num_examples, num_classes)``: slot ``e % lag_epochs`` holds the
        #: outputs recorded at epoch ``e - lag_epochs`` until epoch ``e`` overwrites them.
        self.memory: Tensor | None = None

    def active(self, epoch: int) -> bool:
        """Whether the trajectory loss is on at zero-based ``epoch``."""
        return bool(sam_core.trajectory_active(_check_epoch(epoch), self.start_epoch, self.end_epoch))

    def _memory_for(self, logits: Tensor) -> Tensor:
        classes = logits.shape[1]
        if self.num_classes is not None and classes != self.num_classes:
            raise ValueError(
                f"logits have {classes} classes, but num_classes={self.num_classes}; pass the "
                "model's outputs (batch, num_classes)"
            )
        dtype = torch.promote_types(logits.dtype, torch.float32)
        if self.memory is None:
            self.num_classes = classes
            self.memory = torch.zeros(
                (self.lag_epochs, self.num_examples, classes), dtype=dtype, device=logits.device
            )
        elif self.memory.shape[2] != classes:
            raise ValueError(
                f"logits have {classes} classes, but the memory was made for "
                f"{self.memory.shape[2]}; every call must pass logits of the same shape"
            )
        return self.memory

    def trajectory_loss(self, logits: Tensor, indices: Tensor, epoch: int) -> Tensor:
        r"""The trajectory loss of this batch (a 0-d tensor to add to the loss), and the
        batch's outputs recorded for epoch ``epoch + lag_epochs``.

        ``logits``: the model's outputs ``(B, C)`` (with their graph); ``indices``: the
        examples' indices in the training set ``(B,)`` (any integer tensor, on any device);
        ``epoch``: the zero-based epoch. Before ``start_epoch`` (and from ``end_epoch``) the
        loss is a zero without graph and nothing is computed but the record.
        """
        logits = _check_logits(logits)
        epoch = _check_epoch(epoch)
        if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.shape[0] != logits.shape[0]:
            what = f"shape {tuple(indices.shape)}" if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(
                f"indices must be a 1-d integer tensor with one training-set index per row of "
                f"logits ({logits.shape[0]}), got {what}; hand out the examples' indices from "
                "the data pipeline"
            )
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        if indices.device.type == "cpu" and indices.numel():  # free to check here (no device sync)
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.num_examples:
                raise ValueError(
                    f"indices must be training-set positions in [0, num_examples={self.num_examples}), "
                    f"got values in [{low}, {high}]; pass num_examples=len(train_set)"
                )
        memory = self._memory_for(logits)
        indices = indices.to(memory.device, torch.long, non_blocking=True)
        slot = memory[sam_core.saf_slot(epoch, self.lag_epochs)]
        if self.active(epoch):
            reference = slot.index_select(0, indices).to(logits.device)
            loss = _kl_trajectory(logits, reference, self.temperature, self.lmbda)
        else:
            loss = torch.zeros((), dtype=memory.dtype, device=logits.device)
        slot.index_copy_(0, indices, logits.detach().to(memory.device, memory.dtype))
        return loss

    def _own_state(self) -> dict[str, Any]:
        return {"memory": None if self.memory is None else self.memory.clone(), "num_classes": self.num_classes}

    def _load_own_state(self, own: dict[str, Any]) -> None:
        memory = own["memory"]
        if memory is not None and tuple(memory.shape[:2]) != (self.lag_epochs, self.num_examples):
            raise ValueError(
                f"the saved SAF memory has shape {tuple(memory.shape)}, but this SAF keeps "
                f"({self.lag_epochs}, {self.num_examples}, C); build it with the same "
                "lag_epochs and num_examples as the one saved"
            )
        if memory is None:
            self.memory = None
        elif self.memory is not None and self.memory.shape == memory.shape:
            self.memory.copy_(memory)
        else:
            device = self.memory.device if self.memory is not None else memory.device
            self.memory = memory.to(device).clone()
        self.num_classes = own["num_classes"]


class MESA(_Trajectory):
    r"""Memory-Efficient Sharpness-Aware training: the trajectory loss against the outputs of
    an exponential moving average of the weights, on top of any base optimizer.

    .. math::

        \bar w \leftarrow \beta \bar w + (1 - \beta) w \ \text{after every step}; \qquad
        L = L_{\mathrm{CE}} + \lambda \tau^2 \frac{1}{B} \sum_i
        \mathrm{KL}\bigl(\sigma(f_{\bar w}(x_i) / \tau) \,\Vert\, \sigma(f_w(x_i) / \tau)\bigr)
        \quad \text{for } E_{\mathrm{start}} < e

    (:mod:`sam_core`'s ``ema_update`` and ``trajectory_loss``). :math:`\bar w` starts at the
    weights given; it is one parameter-sized buffer, updated in place with multi-tensor
    kernels at the end of :meth:`step`. Cost: the base optimizer's forward-backward plus one
    forward without backward (:meth:`ema_outputs`) on the steps with the loss::

        opt = sam_torch.MESA(model, torch.optim.SGD, lr=0.1, momentum=0.9)
        for epoch in range(epochs):
            for x, y in loader:
                logits = model(x)
                ema_logits = opt.ema_outputs(model, x) if opt.active(epoch) else None
                loss = F.cross_entropy(logits, y) + opt.trajectory_loss(logits, ema_logits, epoch)
                opt.zero_grad(); loss.backward(); opt.step()

    Reference: Du, Zhou, Feng, Tan and Zhou, "Sharpness-Aware Training for Free", NeurIPS
    2022. Defaults (official code, github.com/AngusDujw/SAF, and its README):
    ``lmbda=0.8``, ``temperature=5``, ``start_epoch=5``, ``decay=0.9998`` (the decay of the
    official script's EMA model). The official EMA model also averages the batch-norm
    statistics and runs in eval mode; :meth:`ema_outputs` runs the model in eval mode with
    the EMA weights and the model's own buffers.

    Args:
        params: the ``nn.Module`` (then :meth:`ema_outputs` may omit it), its parameters or
            param groups.
        base_optimizer: the optimizer class (``torch.optim.SGD``, ``AdamW``, ...).
        decay: :math:`\beta \in [0, 1)`.
        lmbda: :math:`\lambda \ge 0`, the weight of the trajectory loss.
        temperature: :math:`\tau > 0`.
        start_epoch: :math:`E_{\mathrm{start}}`: the loss is on for zero-based epochs
            ``start_epoch < epoch``.
        end_epoch: ``None``, or the loss is off again from this epoch on.
        **base_kwargs: passed to ``base_optimizer``.
    """

    _key = "mesa"

    def __init__(
        self,
        params: Params | nn.Module,
        base_optimizer: BaseOptimizer,
        *,
        decay: float = sam_core.MESA_DEFAULTS["decay"],
        lmbda: float = sam_core.MESA_DEFAULTS["lmbda"],
        temperature: float = sam_core.MESA_DEFAULTS["temperature"],
        start_epoch: int = sam_core.MESA_DEFAULTS["start_epoch"],
        end_epoch: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        sam_core.validate_mesa(
            lmbda=lmbda, temperature=temperature, start_epoch=start_epoch, end_epoch=end_epoch, decay=decay
        )
        self.model = params if isinstance(params, nn.Module) else None
        super().__init__(params, base_optimizer, base_kwargs)
        self.decay = float(decay)
        self.lmbda = float(lmbda)
        self.temperature = float(temperature)
        self.start_epoch = int(start_epoch)
        self.end_epoch = end_epoch
        self._params = [p for g in self.param_groups for p in g["params"]]
        #: The EMA weights :math:`\bar w`, one per parameter, in param-group order.
        self.ema = [p.detach().clone() for p in self._params]
        self._ema_of = {id(p): e for p, e in zip(self._params, self.ema, strict=True)}
        # One multi-tensor update per (device, dtype), with its lists and the decay as a
        # tensor made once: step() allocates nothing but the kernels' temporaries.
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self._params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        self._groups: list[tuple[TorchOps, Tensor, list[Tensor], list[Tensor]]] = []
        for (device, dtype), idx in groups.items():
            ops = TorchOps(device, dtype, foreach=True)
            decay_t = torch.tensor(self.decay, device=device, dtype=ops.acc_dtype)
            self._groups.append(
                (ops, decay_t, [self.ema[i] for i in idx], [self._params[i].detach() for i in idx])
            )

    def active(self, epoch: int) -> bool:
        """Whether the trajectory loss is on at zero-based ``epoch``."""
        return bool(sam_core.trajectory_active(_check_epoch(epoch), self.start_epoch, self.end_epoch))

    def _after_step(self) -> None:
        for ops, decay, ema, params in self._groups:
            sam_core.ema_update(ops, ema, params, decay, out=ema)

    @contextlib.contextmanager
    def _eval(self, model: nn.Module) -> Iterator[None]:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    @torch.no_grad()
    def ema_outputs(self, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> Any:
        r""":math:`f_{\bar w}(x)`: ``model(*args, **kwargs)`` run with the EMA weights (the
        parameters this optimizer does not hold keep their values), in eval mode, without
        gradient, the model untouched (``torch.func.functional_call``). ``model`` may be
        omitted (``None``) when the optimizer was built from the module."""
        model = model if model is not None else self.model
        if not isinstance(model, nn.Module):
            raise TypeError(
                "ema_outputs needs the model: pass it (opt.ema_outputs(model, x)) or build MESA "
                f"from the module (MESA(model, ...)); got {type(model).__name__}"
            )
        weights = {name: self._ema_of.get(id(p), p) for name, p in model.named_parameters()}
        with self._eval(model):
            return torch.func.functional_call(model, weights, args, kwargs, strict=False)

    def trajectory_loss(self, logits: Tensor, ema_logits: Tensor | None, epoch: int) -> Tensor:
        r"""The trajectory loss of this batch, a 0-d tensor to add to the loss: the divergence
        of ``logits`` (with their graph) from ``ema_logits`` (:meth:`ema_outputs`, no gradient)
        at zero-based ``epoch``; a zero without graph while the loss is off, when
        ``ema_logits`` may be ``None``."""
        logits = _check_logits(logits)
        if not self.active(epoch):
            return torch.zeros((), dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        if ema_logits is None:
            raise ValueError(
                f"ema_logits is None at epoch {epoch}, where the trajectory loss is on "
                f"(start_epoch={self.start_epoch}); pass opt.ema_outputs(model, x)"
            )
        ema_logits = _check_logits(ema_logits)
        if ema_logits.shape != logits.shape:
            raise ValueError(
                f"ema_logits has shape {tuple(ema_logits.shape)} and logits {tuple(logits.shape)}; "
                "pass the EMA model's outputs on the same batch"
            )
        return _kl_trajectory(logits, ema_logits, self.temperature, self.lmbda)

    def _own_state(self) -> dict[str, Any]:
        return {"ema": [e.clone() for e in self.ema]}

    def _load_own_state(self, own: dict[str, Any]) -> None:
        saved = own["ema"]
        if len(saved) != len(self.ema) or any(s.shape != e.shape for s, e in zip(saved, self.ema, strict=False)):
            raise ValueError(
                "the saved MESA EMA weights do not match this optimizer's parameters (count or "
                "shapes differ); load a state_dict saved for the same model"
            )
        with torch.no_grad():
            for e, s in zip(self.ema, saved, strict=True):
                e.copy_(s)
