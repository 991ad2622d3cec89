"""trainer=fsdp composes and builds Lightning's FSDPStrategy with a size-based wrapping policy (it needs a GPU to
train: docs/language-models.md)."""

from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy


def test_trainer_fsdp_builds_the_strategy(make_cfg):
    cfg = make_cfg("experiment=lm", "trainer=fsdp", "trainer.strategy.min_params=1234", fast=False)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs.get("auto_wrap_policy").keywords == {"min_num_params": 1234}
