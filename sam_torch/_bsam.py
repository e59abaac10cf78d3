r"""``sam_torch.BSAM``: Bayesian SAM (Möllenhoff & Khan, ICLR 2023) and its predictive."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

import sam_core

from ._bn import disable_running_stats
from ._ops import TorchOps

__all__ = ["BSAM", "predictive"]


class BSAM(Optimizer):
    r"""Bayesian SAM (bSAM): SAM as an Adam-like variational method over a Gaussian posterior.

    The optimizer keeps a diagonal Gaussian posterior
    :math:`\mathcal{N}(\omega, 1 / (N s))` over the weights: the parameters hold its mean
    :math:`\omega`, the state its precision :math:`s` (``"precision"``) and momentum
    :math:`g_m` (``"momentum"``). ``step(closure)`` is Algorithm 1 of the paper
    (:mod:`sam_core`'s ``bsam_*`` functions):

    .. math::

        \theta = \omega + z / \sqrt{N s},\ z \sim \mathcal{N}(0, I); \quad
        g = \nabla \ell(\theta); \quad
        \epsilon = \rho\, g / s; \quad
        g_\epsilon = \nabla \ell(\omega + \epsilon);

        g_m \leftarrow \beta_1 g_m + (1 - \beta_1)(g_\epsilon + \delta \omega); \quad
        s \leftarrow \beta_2 s + (1 - \beta_2)(\sqrt{s}\, |g| + \delta + \gamma); \quad
        \omega \leftarrow \omega - \alpha\, g_m / s.

    The closure is called twice, at the posterior sample :math:`\theta` (the noisy clean
    pass; its loss is returned) and at :math:`\omega + \epsilon`; the parameters hold
    :math:`\omega` again, bit for bit, when ``step`` returns or raises. After training, the
    posterior is what bSAM is for: :func:`predictive` averages the model's predictions over
    samples of it, which are better calibrated than the mean's.

    Reference: Möllenhoff and Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023. The
    defaults are ``pytorch_optimizer``'s ``BSAM``'s (``lr=0.5``, ``betas=(0.9, 0.999)``,
    ``rho=0.05``, ``damping=0.1``, ``weight_decay=1e-4``); the paper tunes ``rho`` and the
    prior precision per data set.

    Args:
        params: parameters or param groups (groups may set ``lr``, ``betas``, ``rho``,
            ``damping``, ``weight_decay``).
        num_data: :math:`N`, the number of training examples (the loss is the batch mean).
        lr: :math:`\alpha`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        rho: :math:`\rho \ge 0`, the size of the ascent step.
        damping: :math:`\gamma \ge 0`, added to the precision estimate.
        weight_decay: :math:`\delta \ge 0`, the precision of the Gaussian prior (also an
            L2 term in the momentum). ``damping + weight_decay`` must be > 0.
        s_init: the initial precision (1 in the paper), > 0.
        gc: gradient centralization (:func:`sam_core.centralize`) of :math:`g` before
            :math:`\epsilon` is formed from it (the precision update uses :math:`|g|` as is).
        seed: ``None`` (default): the noise comes from torch's global generator. An int:
            from generators of this optimizer seeded with it (one per device, saved by
            :meth:`state_dict`), so a run is reproducible and resumes exactly.
        model: optional; the perturbed pass then runs with its batch-norm running
            statistics frozen (they come from the noisy pass), as ``SAM(model=)``.

    The noise of a step is one ``torch.randn(p.shape)`` per parameter (those with
    ``requires_grad``, in param-group order); ``step(closure, noise=[...])`` takes these
    draws instead, e.g. to reproduce a run in another framework.

    Cost: two forward-backward passes per step; three parameter-sized buffers (precision,
    momentum, the mean kept while the parameters move) and the noise.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        num_data: float,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        rho: float = 0.05,
        damping: float = 0.1,
        weight_decay: float = 1e-4,
        *,
        s_init: float = 1.0,
        gc: bool = False,
        seed: int | None = None,
        model: nn.Module | None = None,
    ) -> None:
        sam_core.validate_bsam(
            num_data=num_data, lr=lr, betas=betas, rho=rho, damping=damping,
            weight_decay=weight_decay, s_init=s_init,
        )
        sam_core.check_bool("gc", gc)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        defaults = dict(
            lr=lr, betas=tuple(betas), rho=rho, damping=damping, weight_decay=weight_decay
        )
        super().__init__(params, defaults)
        self.num_data = num_data
        self.s_init = s_init
        self.gc = gc
        self.seed = seed
        self.model = model
        self._generators: dict[str, torch.Generator] = {}
        self._mean_buffers: dict[Tensor, Tensor] = {}  # w while the parameters move
        self._moved: list[Tensor] = []
        #: Loss at the posterior sample and at :math:`\omega + \epsilon` of the last step.
        self.loss: Tensor | None = None
        self.perturbed_loss: Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validated like the constructor's arguments."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        sam_core.validate_bsam(
            num_data=getattr(self, "num_data", 1), lr=group["lr"], betas=group["betas"],
            rho=group["rho"], damping=group["damping"], weight_decay=group["weight_decay"],
        )

    # -- the posterior -------------------------------------------------------------------
    def _params(self) -> list[tuple[dict[str, Any], Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _state_of(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if "precision" not in state:
            state["precision"] = torch.full_like(p, self.s_init, memory_format=torch.preserve_format)
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        return gen

    def draw_noise(self) -> list[Tensor]:
        """Standard-normal draws, one like each parameter, from this optimizer's generators."""
        return [
            torch.randn(p.shape, generator=self._generator(p.device), dtype=p.dtype, device=p.device)
            for _, p in self._params()
        ]

    def posterior_std(self) -> list[Tensor]:
        r""":math:`\sigma = 1 / \sqrt{N s}` for each parameter (``requires_grad``, group order)."""
        return [
            sam_core.bsam_noise_std(self._state_of(p)["precision"], self.num_data)
            for _, p in self._params()
        ]

    @contextlib.contextmanager
    def sampled(self, noise: Sequence[Tensor] | None = None) -> Any:
        r"""A block in which the parameters hold a posterior sample :math:`\omega + \sigma z`.

        ``noise``: the standard-normal :math:`z` (one like each parameter), else drawn with
        :meth:`draw_noise`. On exit the mean :math:`\omega` is back, bit for bit.
        """
        pairs = self._params()
        zs = self._check_noise(noise, pairs)
        with torch.no_grad():
            for (_, p), z in zip(pairs, zs, strict=True):
                self._keep_mean(p)
                p.copy_(sam_core.bsam_sample(p, self._state_of(p)["precision"], z, self.num_data))
        try:
            yield
        finally:
            self._restore()

    def _check_noise(
        self, noise: Sequence[Tensor] | None, pairs: list[tuple[dict[str, Any], Tensor]]
    ) -> list[Tensor]:
        if noise is None:
            return self.draw_noise()
        noise = list(noise)
        if len(noise) != len(pairs) or any(
            tuple(z.shape) != tuple(p.shape) for z, (_, p) in zip(noise, pairs, strict=False)
        ):
            raise ValueError(
                f"noise must hold one tensor like each of the {len(pairs)} parameters (in "
                "param-group order), got shapes "
                f"{[tuple(z.shape) for z in noise]} for {[tuple(p.shape) for _, p in pairs]}"
            )
        return [z.to(device=p.device, dtype=p.dtype) for z, (_, p) in zip(noise, pairs, strict=True)]

    def _keep_mean(self, p: Tensor) -> Tensor:
        buf = self._mean_buffers.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._mean_buffers[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        buf.copy_(p.detach())
        self._moved.append(p)
        return buf

    @torch.no_grad()
    def _restore(self) -> None:
        for p in self._moved:
            p.copy_(self._mean_buffers[p])
        self._moved = []

    # -- the step ------------------------------------------------------------------------
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, noise: Sequence[Tensor] | None = None
    ) -> Any:
        r"""One bSAM step; returns the loss at the posterior sample.

        ``closure`` computes the mean loss of the batch, calls ``backward()`` and returns the
        loss; it is called at the sample :math:`\theta` and at :math:`\omega + \epsilon`
        (gradients are set to ``None`` before each call). ``noise``: see the class docstring.
        """
        if closure is None:
            raise RuntimeError(
                "BSAM.step() needs a closure that computes the loss, calls backward() and "
                "returns the loss; it is called twice: at a posterior sample and at the "
                "perturbed mean"
            )
        pairs = self._params()
        zs = self._check_noise(noise, pairs)
        states = [self._state_of(p) for _, p in pairs]
        try:
            with torch.no_grad():
                for (_, p), z, st in zip(pairs, zs, states, strict=True):
                    self._keep_mean(p)
                    p.copy_(sam_core.bsam_sample(p, st["precision"], z, self.num_data))
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = closure()
            noisy_grads = [p.grad for _, p in pairs]
            with torch.no_grad():
                directions = self._directions(noisy_grads)
                for (group, p), d, st in zip(pairs, directions, states, strict=True):
                    mean = self._mean_buffers[p]
                    if d is None:
                        p.copy_(mean)
                    else:
                        p.copy_(mean + sam_core.bsam_perturbation(d, st["precision"], group["rho"]))
            self.zero_grad(set_to_none=True)
            frozen = disable_running_stats(self.model) if self.model is not None else contextlib.nullcontext()
            with torch.enable_grad(), frozen:
                perturbed_loss = closure()
            perturbed_grads = [p.grad for _, p in pairs]
        finally:
            self._restore()
        with torch.no_grad():
            for (group, p), g, g_eps, st in zip(pairs, noisy_grads, perturbed_grads, states, strict=True):
                if g is None or g_eps is None:
                    continue
                beta1, beta2 = group["betas"]
                wd = group["weight_decay"]
                st["momentum"].copy_(sam_core.bsam_momentum_update(st["momentum"], g_eps, p, beta1, wd))
                st["precision"].copy_(
                    sam_core.bsam_precision_update(st["precision"], g, beta2, wd, group["damping"])
                )
                p.add_(sam_core.bsam_step(st["momentum"], st["precision"], group["lr"]))
        self.loss = _detached(loss)
        self.perturbed_loss = _detached(perturbed_loss)
        return loss

    def _directions(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """The gradients :math:`\\epsilon` is formed from: centralized copies with ``gc``."""
        if not self.gc:
            return list(grads)
        out: list[Tensor | None] = []
        for g in grads:
            if g is None:
                out.append(None)
                continue
            ops = TorchOps(g.device, g.dtype, foreach=False)
            out.append(sam_core.centralize(ops, [g])[0])
        return out

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict plus the noise generators' states (``"bsam"``)."""
        state = super().state_dict()
        state["bsam"] = {key: gen.get_state() for key, gen in self._generators.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generators = state_dict.pop("bsam", {})
        super().load_state_dict(state_dict)
        for key, gen_state in generators.items():
            gen = self._generator(torch.device(key))
            if gen is not None:
                gen.set_state(gen_state)


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


@torch.no_grad()
def predictive(
    model: nn.Module,
    optimizer: BSAM,
    inputs: Any,
    *,
    samples: int = 16,
    seed: int = 0,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    r"""bSAM's predictive distribution: the model's outputs averaged over posterior samples.

    .. math::

        p(y \mid x) \approx \frac{1}{S} \sum_{k=1}^{S} \operatorname{softmax}(f(x; \theta_k)),
        \qquad \theta_k \sim \mathcal{N}(\omega, 1 / (N s))

    with :math:`\omega, s` the posterior of ``optimizer`` (a :class:`BSAM` that trained
    ``model``). The samples come from a generator seeded with ``seed``, so the result is
    reproducible and the optimizer's own noise is not consumed; the parameters hold the
    mean again afterwards, bit for bit. Put the model in ``eval()`` mode first (batch-norm
    statistics are not re-estimated per sample).

    Args:
        model: the trained module (its parameters are the optimizer's).
        optimizer: the :class:`BSAM` that trained it.
        inputs: passed to ``model(inputs)``.
        samples: :math:`S`, an int >= 1.
        seed: the seed of the samples.
        transform: maps the model's output to the probabilities to average; by default
            ``softmax`` over the last dimension.
    """
    if not isinstance(optimizer, BSAM):
        raise TypeError(
            f"predictive needs the sam_torch.BSAM that trained the model, got "
            f"{type(optimizer).__name__}"
        )
    sam_core.check_positive_int("samples", samples)
    transform = transform or (lambda out: out.softmax(dim=-1))
    pairs = optimizer._params()
    generators: dict[str, torch.Generator] = {}

    def draw(p: Tensor) -> Tensor:
        gen = generators.get(str(p.device))
        if gen is None:
            gen = generators[str(p.device)] = torch.Generator(device=p.device)
            gen.manual_seed(seed)
        return torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)

    total: Tensor | None = None
    for _ in range(samples):
        with optimizer.sampled([draw(p) for _, p in pairs]):
            probs = transform(model(inputs))
        total = probs if total is None else total + probs
    assert total is not None
    return total / samples
