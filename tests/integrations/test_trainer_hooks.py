"""SAMTrainer: the optimizer step hooks fire once per SAM step (batch SAM and m-sharpness)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from sam_torch.integrations.transformers import SAMTrainer  # noqa: E402
from tests.integrations.test_transformers import TokenTask, make_args, tiny_bert  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize(
    ("m_sharpness", "accumulation"), [(None, 1), (None, 2), (4, 1), (4, 2)]
)
def test_each_sam_step_fires_the_global_and_local_hooks_once(tmp_path, m_sharpness, accumulation):
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", type(o).__name__))),
    ]
    try:
        args = make_args(tmp_path, max_steps=3, per_device_train_batch_size=8 // accumulation,
                         gradient_accumulation_steps=accumulation, logging_steps=10)
        trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=TokenTask(),
                             sam_rho=0.05, m_sharpness=m_sharpness)
        trainer.create_optimizer()
        local = []
        trainer.sam.register_step_pre_hook(lambda o, a, k: local.append("pre"))
        trainer.sam.register_step_post_hook(lambda o, a, k: local.append("post"))
        trainer.train()
    finally:
        for h in handles:
            h.remove()
    assert calls == [("pre", "SAM"), ("post", "SAM")] * 3
    assert local == ["pre", "post"] * 3
