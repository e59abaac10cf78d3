r"""SAM in the Hugging Face ``transformers.Trainer``: :class:`SAMTrainer`.

The ``Trainer`` runs forward and backward itself (``training_step``), clips the gradient
(``max_grad_norm``) and then calls ``optimizer.step()`` without a closure, which
:class:`sam_torch.SAM` cannot use. :class:`SAMTrainer` keeps the Trainer's loop and puts
SAM's two passes inside it:

1. the Trainer's own ``training_step`` runs the clean forward and backward of every
   micro-batch of the optimizer step (``gradient_accumulation_steps`` of them);
2. after the last one, ``first_step()`` moves the weights to :math:`w + e(w)` with the
   perturbation taken from the full (accumulated) clean gradient, and the same
   ``training_step`` runs again on the same micro-batches at :math:`w + e`: same loss
   function, ``num_items_in_batch`` normalization, autocast, ``accelerator.backward``
   (and its ``GradScaler``), BatchNorm running statistics left untouched
   (:func:`sam_torch.disable_running_stats`);
3. the Trainer then clips and logs the norm of the gradient in ``.grad``, the
   perturbed-point gradient, which is the one the base optimizer steps with; its
   ``optimizer.step()`` becomes ``second_step()``: :math:`w` restored bit for bit, base
   step, LR scheduler step.

With ``k`` micro-batches this is the accumulation recipe of :class:`sam_torch.SAM`
(clean pass over all micro-batches, one perturbation, perturbed pass over the same
micro-batches): one SAM step on the whole accumulated batch.

With ``m_sharpness=m`` each micro-batch is instead split into chunks of ``m`` examples, each
perturbed with its own gradient (the definition of :func:`sam_torch.m_sharpness_step`), and
the Trainer clips and steps with the mean of the chunks' perturbed-point gradients.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

import sam_core
import sam_torch
from sam_torch import SAM, RNGReplay, disable_running_stats
from sam_torch._entry import close_step, open_step
from sam_torch._msharpness import (
    _UNSUPPORTED,
    _batch_size,
    _MStep,
    _RunningStats,
    _split,
)

__all__ = ["SAMTrainer"]


class SAMTrainer(Trainer):
    r"""A ``transformers.Trainer`` whose optimizer step is a SAM step (Foret et al., ICLR 2021).

    Everything else is the Trainer's: model, data collator, ``TrainingArguments``,
    ``compute_loss`` (or ``compute_loss_func``), LR scheduler, logging, evaluation,
    checkpoints. Each optimizer step computes

    .. math::

        e = \rho \frac{T_w^2 g}{\lVert T_w g \rVert + \epsilon}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\ \mathrm{clip}(\nabla L(w + e))\big),

    with :math:`g = \nabla L(w)` the gradient accumulated over the step's micro-batches
    (:math:`T_w = 1` for SAM, :math:`|w| + \eta` for ASAM; Kwon et al., ICML 2021). SAM for
    language-model fine-tuning: Bahri et al., "Sharpness-Aware Minimization Improves
    Language Model Generalization", ACL 2022.

    Two ways to choose the optimizer:

    * ``SAMTrainer(model, args, ..., sam_rho=0.05)``: SAM around the optimizer the
      Trainer would build itself (``args.optim``, ``learning_rate``, ``weight_decay`` on
      its decay/no-decay parameter groups, Adam betas and epsilon, or
      ``optimizer_cls_and_kwargs``); ``sam_class`` picks a variant
      (``sam_torch.GSAM``, ``LookSAM``, ...) and ``sam_kwargs`` passes its other arguments.
    * ``SAMTrainer(..., optimizers=(sam_torch.SAM(model.parameters(), torch.optim.AdamW,
      lr=2e-5, rho=0.05), None))``: your own SAM (or variant) instance, as is.

    Semantics (``docs/huggingface.md`` gives the reasons):

    * **Dropout** (``sam_dropout``): ``"same"`` (default) replays the random-number
      generators so the perturbed pass of each micro-batch draws the same dropout masks
      as its clean pass: :math:`e` ascends the same sampled loss
      :math:`L_{B,\xi}` whose gradient is then taken at :math:`w + e`, so
      :math:`L(w+e) - L(w)` measures sharpness rather than dropout noise, and
      ``rho = 0`` gives exactly the base optimizer's step (tested bit for bit against a
      plain ``Trainer``). The generators are left where the clean pass left them, so the
      random stream after a step is the plain Trainer's. ``"fresh"`` draws new masks in
      the perturbed pass (two dropout samples per step).
    * **BatchNorm** running statistics are updated by the clean pass only.
    * **Gradient clipping** (``max_grad_norm``) applies to the gradient the base
      optimizer steps with, :math:`\nabla L(w + e)`; the logged ``grad_norm`` is its norm
      before clipping, as in the Trainer. The clean gradient is not clipped: :math:`e`
      depends on :math:`g / \lVert g \rVert` only, so clipping it (a positive rescaling)
      would not change the perturbation. For GSAM and WSAM, whose base step also uses
      the clean gradient, only the perturbed-point part is clipped; for LookSAM's and
      every-k SAM's one-pass steps the clipped gradient is the clean one.
    * **Gradient accumulation**: the clean pass over all micro-batches, one perturbation
      from the accumulated gradient, the perturbed pass over the same micro-batches (the
      recipe of :class:`sam_torch.SAM`'s docstring); under DDP both passes synchronize
      on the last micro-batch only, so the perturbation uses the global gradient.
    * **Mixed precision**: ``bf16`` needs nothing more (norms accumulate in float32).
      With ``fp16`` the Trainer's ``GradScaler`` scales both passes; the clean gradient
      is unscaled and closes one scaler iteration before ``first_step``, the perturbed
      one is unscaled by the Trainer's clipping and stepped by ``scaler.step`` (an
      ``inf`` in either pass skips the step with :math:`w` restored), as
      :class:`sam_torch.ScaledSAM` does; the scaler's ``growth_interval`` counts passes.
    * **Logs**: besides the Trainer's ``loss`` (the clean loss :math:`L(w)`),
      ``grad_norm`` and ``learning_rate``, each training log holds ``sharpness``, the
      mean of :math:`L(w + e) - L(w)` over the SAM steps since the last log, and
      ``sam_grad_norm``, the mean norm the perturbation was scaled by
      (:math:`\lVert g \rVert`, or :math:`\lVert T_w g \rVert` for ASAM). They are
      accumulated on the device and read once per log.
    * **Checkpoints**: the Trainer saves and loads the SAM's ``state_dict()`` (base
      optimizer state and SAM's hyperparameters) and its scheduler; resuming with
      ``trainer.train(resume_from_checkpoint=...)`` continues exactly.
    * **m-sharpness** (``m_sharpness=m``; Foret et al., ICLR 2021, Sec. 4.1): each
      micro-batch of :math:`B` examples is split into :math:`B/m` consecutive chunks; for
      each chunk :math:`c`, the Trainer's ``compute_loss`` (under its autocast context,
      ``num_items_in_batch=None``: the chunk's own mean loss :math:`L_c`) and
      ``accelerator.backward`` give :math:`g_c = \nabla L_c(w)`, ``first_step()`` moves to
      :math:`w + e_c` with :math:`e_c` built from :math:`g_c` alone, the perturbed loss is
      backpropagated into ``.grad`` with weight :math:`1/(kA)` (:math:`k` chunks per
      micro-batch, :math:`A` micro-batches per step), and ``restore()`` puts :math:`w`
      back bit for bit. After the step's last micro-batch ``.grad`` holds
      :math:`G = \frac{1}{kA} \sum_c \nabla L_c(w + e_c)`, the definition of
      :func:`sam_torch.m_sharpness_step` over the step's :math:`AB` examples (chunks never
      straddle micro-batches); the Trainer clips it (``max_grad_norm``), logs its norm and
      calls ``optimizer.step()``, which applies the base step (``skip_nonfinite`` as in
      ``m_sharpness_step``). ``m = B`` with one micro-batch is batch SAM bit for bit.
      Dropout: with ``sam_dropout="same"`` each chunk's perturbed pass replays that chunk's
      clean-pass masks. BatchNorm: each chunk normalizes with its own statistics; the
      running statistics are updated once per micro-batch, from the mean of the chunks'
      clean-pass statistics. Logs: ``loss`` the mean of the :math:`L_c(w)`, ``sharpness``
      the mean of :math:`L_c(w + e_c) - L_c(w)`, ``sam_grad_norm`` the mean of the chunks'
      norms. Errors: a variant for which ``m_sharpness_step`` is not defined (GSAM, WSAM,
      SAMON, FriendlySAM, VaSSO, LookSAM, EveryKSAM, MomentumSAM: ``TypeError`` at
      construction), fp16 / a ``GradScaler``, several processes or GPUs (``ValueError``),
      ``per_device_train_batch_size`` not a multiple of ``m`` (``ValueError`` at
      construction) and a micro-batch that is not, such as the last incomplete batch of an
      epoch (``ValueError`` before the step computes anything, advising
      ``dataloader_drop_last=True``).

    Not supported: DeepSpeed (it owns the optimizer step; ``ValueError``) and optimizers
    the Trainer builds through a factory or from the model (GaLore, LOMO, Muon, ...).
    FSDP is untested.

    Args:
        *args, **kwargs: as ``transformers.Trainer``.
        sam_rho: the neighbourhood radius when the Trainer builds the optimizer
            (default: ``sam_class``'s, 0.05 for SAM).
        sam_adaptive: ASAM when the Trainer builds the optimizer (default: ``sam_class``'s,
            ``False`` for SAM).
        sam_class: :class:`sam_torch.SAM` or one of its variants (default ``SAM``).
        sam_kwargs: other keyword arguments of ``sam_class`` (``eta``, ``alpha``, ``k``,
            ``skip_nonfinite``, ...).
        sam_dropout: ``"same"`` or ``"fresh"`` dropout masks in the perturbed pass (the
            Trainer runs the passes, so this, not the SAM's own ``dropout``, decides).
        m_sharpness: examples per chunk of m-sharpness, a divisor of
            ``per_device_train_batch_size``; ``None`` (default): batch SAM.

    The ``sam_*`` arguments other than ``sam_dropout`` only apply when the Trainer builds
    the optimizer; giving them together with a SAM instance in ``optimizers`` raises
    ``ValueError``.
    """

    def __init__(
        self,
        *args: Any,
        sam_rho: float | None = None,
        sam_adaptive: bool | None = None,
        sam_class: type[SAM] | None = None,
        sam_kwargs: dict[str, Any] | None = None,
        sam_dropout: Literal["same", "fresh"] = "same",
        m_sharpness: int | None = None,
        **kwargs: Any,
    ) -> None:
        if sam_dropout not in ("same", "fresh"):
            raise ValueError(f"sam_dropout must be 'same' or 'fresh', got {sam_dropout!r}")
        if m_sharpness is not None:
            sam_core.check_positive_int("m_sharpness", m_sharpness)
            reason = _m_sharpness_unsupported(sam_class)
            if reason is not None:
                raise TypeError(_variant_message(m_sharpness, sam_class, reason))
        if sam_class is not None and not (isinstance(sam_class, type) and issubclass(sam_class, SAM)):
            raise TypeError(
                "sam_class must be sam_torch.SAM or one of its variants (sam_torch.GSAM, ...), "
                f"got {sam_class!r}"
            )
        if sam_kwargs is not None and not isinstance(sam_kwargs, dict):
            raise TypeError(f"sam_kwargs must be a dict, got {type(sam_kwargs).__name__}")
        given = {
            name: value
            for name, value in (
                ("sam_rho", sam_rho),
                ("sam_adaptive", sam_adaptive),
                ("sam_class", sam_class),
                ("sam_kwargs", sam_kwargs),
            )
            if value is not None
        }
        if sam_rho is not None or sam_adaptive is not None:  # fail here, not at train()
            try:
                sam_core.validate_sam(
                    rho=0.05 if sam_rho is None else sam_rho, eps=1e-12, eta=0.01,
                    adaptive=bool(sam_adaptive),
                )
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"sam_rho/sam_adaptive: {exc}") from None
        for key in ("rho", "adaptive"):
            if sam_kwargs is not None and key in sam_kwargs:
                raise ValueError(
                    f"sam_kwargs holds {key!r}; pass it as sam_{key}= instead "
                    f"(sam_kwargs={sam_kwargs!r})"
                )
        super().__init__(*args, **kwargs)
        optimizer = self.optimizer
        if optimizer is not None and not isinstance(optimizer, SAM):
            raise TypeError(
                f"SAMTrainer needs a sam_torch.SAM optimizer, got {type(optimizer).__name__} in "
                "optimizers=; pass optimizers=(sam_torch.SAM(model.parameters(), "
                "torch.optim.AdamW, lr=..., rho=0.05), None), or leave optimizers unset and "
                "give sam_rho= to wrap the optimizer the Trainer builds"
            )
        if optimizer is not None and given:
            raise ValueError(
                f"{', '.join(sorted(given))} only apply when the Trainer builds the optimizer, "
                f"but optimizers= already holds a {type(optimizer).__name__}; set rho, "
                "adaptive, ... on that instance, or drop optimizers="
            )
        if self.is_deepspeed_enabled:
            raise ValueError(
                "SAMTrainer does not support DeepSpeed: DeepSpeed runs the optimizer step "
                "itself, between SAM's two passes there is no place to restore the weights. "
                "Drop the deepspeed= argument."
            )
        if m_sharpness is not None:
            self._check_m_sharpness_setting(m_sharpness, optimizer)
        self.sam_rho = sam_rho  # None: the class's default (0.05 for SAM)
        self.sam_adaptive = sam_adaptive  # None: the class's default (MomentumSAM has none)
        self.sam_class = SAM if sam_class is None else sam_class
        self.sam_kwargs = dict(sam_kwargs or {})
        self.sam_dropout = sam_dropout
        #: Examples per chunk of m-sharpness (``None``: batch SAM).
        self.m_sharpness = m_sharpness
        #: The :class:`sam_torch.SAM` being trained (``None`` until ``train()`` builds it
        #: when the Trainer builds the optimizer). ``trainer.optimizer`` is the Accelerate
        #: wrapper around an adapter of it.
        self.sam: SAM | None = optimizer
        self._window: list[Any] | None = None  # micro-batches of the current optimizer step
        self._window_index = 0
        self._rng_states: list[RNGReplay] = []
        self._clean_loss: Tensor | None = None
        self._log_sums: dict[str, Tensor] = {}
        self._log_steps = 0
        self._m_step: _TrainerMStep | None = None  # m-sharpness: the step being accumulated
        self.add_callback(_RestoreAfterStep(self))

    def _check_m_sharpness_setting(self, m: int, optimizer: Any) -> None:
        """``m_sharpness=``: the settings it is defined and tested for, checked up front."""
        if optimizer is not None:
            reason = _m_sharpness_unsupported(type(optimizer))
            if reason is not None:
                raise TypeError(_variant_message(m, type(optimizer), reason))
        args = self.args
        if args.world_size > 1 or args.n_gpu > 1:
            raise ValueError(
                f"SAMTrainer(m_sharpness={m}) runs in one process on one device, got "
                f"world_size={args.world_size}, n_gpu={args.n_gpu}; run on one device, or drop "
                "m_sharpness= (SAMTrainer's batch SAM supports DDP: global SAM)"
            )
        if args.fp16 or getattr(self.accelerator, "scaler", None) is not None:
            raise ValueError(
                f"SAMTrainer(m_sharpness={m}) does not support fp16 (a GradScaler's loss scale "
                "would have to be shared by the k perturbed passes of a step); use bf16=True "
                "(or float32), or drop m_sharpness="
            )
        batch = args.per_device_train_batch_size
        try:
            sam_core.m_sharpness_chunks(batch, m)
        except ValueError as exc:
            raise ValueError(f"SAMTrainer(m_sharpness={m}), per_device_train_batch_size: {exc}") from None

    # -- optimizer --------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build (or take) the SAM optimizer and hand the Trainer an adapter whose
        ``step()`` finishes the SAM step (``second_step()``)."""
        if isinstance(self.optimizer, _SAMStep) or isinstance(
            getattr(self.optimizer, "optimizer", None), _SAMStep
        ):
            return self.optimizer  # a second train() call: already built and prepared
        if self.optimizer is None:
            self.sam = self._build_sam(self.model if model is None else model)
            if self.m_sharpness is not None:
                reason = _m_sharpness_unsupported(type(self.sam))
                if reason is not None:
                    raise TypeError(_variant_message(self.m_sharpness, type(self.sam), reason))
        else:
            self.sam = self.optimizer
        self.optimizer = _SAMStep(self.sam)
        return self.optimizer

    def _build_sam(self, model: nn.Module) -> SAM:
        cls_and_kwargs = getattr(self, "optimizer_cls_and_kwargs", None)  # newer Trainer versions only
        if cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs = dict(optimizer_kwargs)
        special = sorted(set(optimizer_kwargs).intersection(("params", "model", "optimizer_dict")))
        is_factory = _is_optimizer_factory(optimizer_cls)
        if special or is_factory or not callable(optimizer_cls):
            raise ValueError(
                f"SAMTrainer cannot wrap optim={self.args.optim!r}: the Trainer builds it "
                f"{'with ' + repr(special) if special else 'through a factory'}, not as "
                "optimizer_cls(param_groups, **kwargs). Use a torch.optim-style optimizer "
                "(optim='adamw_torch', 'sgd', ...) or pass your own SAM in optimizers="
            )
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        # The base optimizer's hyperparameters (lr, betas, its own eps, fused, ...) are
        # bound here so none of them is taken for one of SAM's arguments.
        base = functools.partial(optimizer_cls, **optimizer_kwargs)
        kwargs = dict(self.sam_kwargs)
        if self.sam_rho is not None:
            kwargs["rho"] = self.sam_rho
        if self.sam_adaptive is not None:
            kwargs["adaptive"] = self.sam_adaptive
        return self.sam_class(groups, base, **kwargs)

    # -- the step ---------------------------------------------------------------------
    def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's micro-batches of one optimizer step, remembered for the perturbed pass."""
        result = super().get_batch_samples(*args, **kwargs)
        self._window = list(result[0])
        self._window_index = 0
        return result

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """The Trainer's forward and backward at :math:`w`; after the step's last micro-batch,
        ``first_step()`` and the same forward and backward at :math:`w + e` for every
        micro-batch. Returns the clean loss (what the Trainer logs as ``loss``)."""
        sam = self.sam
        if sam is None:  # called outside train(): behave as the Trainer
            return super().training_step(model, inputs, num_items_in_batch)
        window = self._window
        if window is None or self._window_index >= len(window):
            # called on its own (no get_batch_samples before it): one micro-batch per step
            window, self._window, self._window_index = [inputs], [inputs], 0
        index = self._window_index
        self._window_index += 1
        first, last = index == 0, index == len(window) - 1
        if self.m_sharpness is not None:
            return self._m_sharpness_step(model, inputs, window, first, last)
        if first:
            if sam.is_perturbed:  # the scaler skipped the last step: w + e still installed
                sam.restore()
            self._rng_states = []
        if isinstance(sam, sam_torch.MomentumSAM):  # one pass, at w + e, from the momentum
            if first:
                sam.first_step()
            loss = super().training_step(model, inputs, num_items_in_batch)
            if last:
                self._window = None
            return loss
        same_masks = self.sam_dropout == "same"
        if same_masks:  # this micro-batch's clean-pass generators, replayed at w + e
            self._rng_states.append(RNGReplay([self.args.device]))
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._clean_loss = loss if first else self._clean_loss + loss
        if not last:
            return loss
        self._window = None
        if not getattr(sam, "is_full_step", True):  # LookSAM / every-k: a one-pass step
            return loss
        self._unscale_clean_gradient()
        sam.first_step(zero_grad=True)
        grad_norm = sam.grad_norm
        perturbed_loss = None
        try:
            with disable_running_stats(model):
                for i, micro_batch in enumerate(window):
                    # each replay ends with the generators where the clean passes left them
                    replay = self._rng_states[i] if same_masks else contextlib.nullcontext()
                    sync = contextlib.nullcontext() if i == len(window) - 1 else self._no_sync(model)
                    with sync, replay:
                        part = super().training_step(model, micro_batch, num_items_in_batch)
                    perturbed_loss = part if perturbed_loss is None else perturbed_loss + part
        except BaseException:
            sam.restore()
            raise
        finally:
            self._rng_states = []
        self._record(perturbed_loss - self._clean_loss, grad_norm)
        return loss

    def _no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return self.accelerator.no_sync(model)

    def _unscale_clean_gradient(self) -> None:
        """fp16: unscale the clean gradient and close that ``GradScaler`` iteration, so the
        Trainer's clipping can unscale the perturbed one and ``scaler.step`` check it."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        optimizer = self.optimizer  # unscale the object scaler.step() will see: the adapter
        while not isinstance(optimizer, _SAMStep) and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        scaler.unscale_(optimizer)
        scaler.update()

    # -- m-sharpness ------------------------------------------------------------------
    def _m_sharpness_step(
        self, model: nn.Module, inputs: Any, window: list[Any], first: bool, last: bool
    ) -> Tensor:
        """One micro-batch of an m-sharpness step: for each chunk of ``m`` examples, the
        Trainer's loss and backward at :math:`w`, ``first_step()`` from that gradient alone,
        the loss and backward at :math:`w + e_c` added into ``.grad``, ``restore()``.
        Returns the micro-batch's share of the clean loss."""
        sam = self.sam
        assert sam is not None
        m = self.m_sharpness
        if first:
            if sam.is_perturbed:
                sam.restore()
            if getattr(self.accelerator, "scaler", None) is not None:
                raise ValueError(
                    f"SAMTrainer(m_sharpness={m}) does not support a GradScaler (fp16): its "
                    "loss scale would have to be shared by the k perturbed passes of a step; "
                    "use bf16=True (or float32), or drop m_sharpness="
                )
            for micro_batch in window:  # before anything of this step is computed
                self._m_chunks(_batch_size(_as_batch(micro_batch)))
            model.train()
            self._m_step = _TrainerMStep(model)
            self._adapter().m_step = None
            open_step(sam)  # one SAM step (its hooks) over the chunks' first_step/restore
        step = self._m_step
        if step is None:  # pragma: no cover - first is always seen before the others
            raise RuntimeError("SAMTrainer(m_sharpness=...): a micro-batch outside a step")
        if last:
            self._window = None
        model.train()
        batch = _as_batch(self._prepare_inputs(inputs))
        k = self._m_chunks(_batch_size(batch))
        accumulation = getattr(self, "current_gradient_accumulation_steps", None)
        accumulation = accumulation or self.args.gradient_accumulation_steps
        scale = 1.0 / (k * accumulation)  # G = mean over the step's chunks
        stats = _RunningStats(model)
        try:
            # the shared chunk loop: accelerator.backward (its loss scaling), perturbed
            # losses weighted 1/(kA) into .grad, dropout replayed per chunk, no base step
            clean_sum, perturbed_sum = step.run_chunks(
                sam, model, _split(batch, m), lambda chunk: self._chunk_loss(model, chunk),
                stats, backward=self.accelerator.backward, weight=scale,
                same_masks=self.sam_dropout == "same",
            )
        except BaseException:
            self._m_step = None
            close_step(sam, completed=False)
            raise
        stats.commit()
        clean, perturbed = clean_sum * scale, perturbed_sum * scale
        step.add(clean, perturbed)
        if last:
            assert step.clean is not None and step.perturbed is not None
            self._record(step.perturbed - step.clean, step.grad_norm)
            self._adapter().m_step = step
            self._m_step = None
        return clean

    def _m_chunks(self, batch_size: int) -> int:
        m = self.m_sharpness
        try:
            return sam_core.m_sharpness_chunks(batch_size, m)
        except ValueError as exc:
            raise ValueError(
                f"SAMTrainer(m_sharpness={m}): {exc}. If it is the last, incomplete batch of "
                "an epoch (the dataset size is not a multiple of the batch size), set "
                "dataloader_drop_last=True in TrainingArguments."
            ) from None

    def _chunk_loss(self, model: nn.Module, chunk: dict[str, Any]) -> Tensor:
        """The Trainer's ``compute_loss`` under its autocast context, for one chunk: the
        chunk's own mean loss (``num_items_in_batch=None``)."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, dict(chunk), num_items_in_batch=None)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            what = (
                f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
                else type(loss).__name__
            )
            raise ValueError(
                f"SAMTrainer(m_sharpness={self.m_sharpness}): compute_loss must return the "
                f"chunk's mean loss as a 0-d tensor, got {what}"
            )
        return loss

    def _adapter(self) -> _SAMStep:
        optimizer = self.optimizer
        while not isinstance(optimizer, _SAMStep) and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        if not isinstance(optimizer, _SAMStep):  # pragma: no cover - create_optimizer sets it
            raise RuntimeError("SAMTrainer: the optimizer is not SAMTrainer's step adapter")
        return optimizer

    # -- logging ----------------------------------------------------------------------
    def _record(self, sharpness: Tensor, grad_norm: Tensor | None) -> None:
        values = {"sharpness": sharpness.detach().float()}
        if grad_norm is not None:
            values["sam_grad_norm"] = grad_norm.detach().float()
        for key, value in values.items():
            total = self._log_sums.get(key)
            value = value.to(self.args.device)
            self._log_sums[key] = value if total is None else total + value
        self._log_steps += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log``; training logs also get ``sharpness`` and ``sam_grad_norm``."""
        if "loss" in logs and self._log_steps:
            for key, total in self._log_sums.items():
                logs[key] = total.item() / self._log_steps
            self._log_sums = {}
            self._log_steps = 0
        super().log(logs, *args, **kwargs)


class _SAMStep(torch.optim.Optimizer):
    """What the Trainer and Accelerate see as the optimizer: a view of a :class:`SAM`
    whose closure-free ``step()`` completes the SAM step the Trainer's ``training_step``
    started: ``second_step()`` when the weights hold :math:`w + e`, otherwise the SAM's
    own ``step()`` (LookSAM's and every-k SAM's one-pass steps use the gradient in
    ``.grad``). Groups, state and ``state_dict`` are the SAM's (checkpoints hold the
    SAM's ``state_dict``)."""

    def __init__(self, sam: SAM) -> None:  # no Optimizer.__init__: everything is the SAM's
        self.sam = sam
        #: m-sharpness: the step whose perturbed-point gradients ``.grad`` holds, finished
        #: (skip check, base step) by ``step()``.
        self.m_step: _TrainerMStep | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.sam.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.sam.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.sam.state

    @state.setter
    def state(self, state: Any) -> None:
        self.sam.state = state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.sam.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.sam.defaults = defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.sam.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.sam.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sam.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sam.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is not None:
            return self.sam.step(closure)
        if self.m_step is not None:
            m_step, self.m_step = self.m_step, None
            m_step.finish_step(self.sam)
            close_step(self.sam, completed=True)
            return None
        if self.sam.is_perturbed:
            self.sam.second_step()
            return None
        if hasattr(self.sam, "is_full_step"):  # LookSAM / EveryKSAM between full steps
            return self.sam.step()
        raise RuntimeError(
            "optimizer.step() found no pending SAM step: in SAMTrainer the perturbed pass "
            "runs in training_step(). If you override training_step, call "
            "super().training_step(...) for every micro-batch."
        )

    def __repr__(self) -> str:
        return f"SAMTrainer step adapter of {self.sam!r}"


class _RestoreAfterStep(TrainerCallback):
    """Right after ``optimizer.step()``: if a ``GradScaler`` skipped the step (an ``inf``
    in the perturbed gradient), ``second_step()`` never ran, so put :math:`w` back before
    the Trainer logs, evaluates or saves."""

    def __init__(self, trainer: SAMTrainer) -> None:
        self._trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sam = self._trainer.sam
        if sam is not None and sam.is_perturbed:
            sam.restore()


def _is_optimizer_factory(optimizer_cls: Any) -> bool:
    try:  # transformers >= 5: optimizers built from the model (Muon, Dion)
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:
        return False
    return bool(is_optimizer_factory(optimizer_cls))


class _TrainerMStep(_MStep):
    """An m-sharpness optimizer step of the Trainer: the shared chunk loop's figures over
    the step's micro-batches, the running statistics at its start (put back if the step is
    skipped), and its end, run by ``optimizer.step()``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.start = _RunningStats(model)

    def finish_step(self, sam: SAM) -> None:
        skip = self.nonfinite(sam)
        if skip:
            self.start.undo()
        self.finish(sam, skip)


def _as_batch(inputs: Any) -> Any:
    """A Trainer micro-batch (a dict, or a ``Mapping`` such as ``BatchEncoding``) as a dict."""
    return dict(inputs.items()) if isinstance(inputs, Mapping) else inputs


def _m_sharpness_unsupported(cls: type | None) -> str | None:
    """Why m-sharpness is not defined for a SAM variant (``m_sharpness_step``'s list)."""
    for c in getattr(cls, "__mro__", ()):
        if c.__name__ in _UNSUPPORTED and c.__module__.startswith("sam_torch"):
            return _UNSUPPORTED[c.__name__]
    return None


def _variant_message(m: int, cls: type | None, reason: str) -> str:
    name = getattr(cls, "__name__", repr(cls))
    return (
        f"SAMTrainer(m_sharpness={m}) does not support {name}: {reason}, so perturbing each "
        "chunk with its own gradient is not defined for it. Use sam_torch.SAM "
        "(sam_adaptive=True for ASAM), or m_sharpness=None."
    )
