"""Integrations of :mod:`sam_torch` with training frameworks.

Each submodule imports its framework when it is imported itself; this package imports
nothing, so ``import sam_torch`` never needs them:

* :mod:`sam_torch.integrations.transformers`: :class:`~sam_torch.integrations.transformers.SAMTrainer`,
  a ``transformers.Trainer`` that runs SAM (needs the ``hf`` extra:
  ``pip install "sam-opt[torch,hf]"``).

Hugging Face Accelerate needs no adapter: ``accelerator.prepare`` accepts a
:class:`sam_torch.SAM`, and the loop is the two-step API with ``accelerator.backward`` in
both passes (``docs/huggingface.md``).
"""
