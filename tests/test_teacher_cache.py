"""perf.cache_teacher: teacher outputs computed once give the same losses and metrics as a teacher forward per
step, the teacher is not called again once the cache is filled, and the cache is refused where it is wrong."""

import pytest
import torch
from helpers import assert_same_results, build_run_module

from kd_lab.errors import KDLabError
from kd_lab.run.train import train


def count_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("algorithm", ["kd", "fitnet"])  # logits only, and a tapped teacher feature
def test_cached_and_uncached_give_the_same_loss(make_cfg, algorithm):
    module, datamodule = build_run_module(make_cfg(f"algorithm={algorithm}", "perf.cache_teacher=true"))
    batch = next(iter(datamodule.train_dataloader()))
    module.train()
    cache, module.step.teacher_cache = module.step.teacher_cache, None
    uncached = module.step.training_terms(batch)
    module.step.teacher_cache = cache
    cached = module.step.training_terms(batch)
    assert cache.filled and uncached.keys() == cached.keys()
    for name in uncached:
        assert float(cached[name].detach()) == pytest.approx(float(uncached[name].detach()), abs=1e-6), name


def test_teacher_forward_is_not_called_after_the_cache_is_filled(make_cfg):
    module, datamodule = build_run_module(make_cfg("perf.cache_teacher=true"))
    calls = count_calls(module.teacher)
    batches = list(datamodule.train_dataloader())
    module.train()
    module.step.outputs(batches[0], with_teacher=True)
    filled = calls[0]
    assert filled == -(-datamodule.num_train // datamodule.eval_batch_size)  # one pass over the training set
    assert module.step.teacher_cache.nbytes == datamodule.num_train * datamodule.num_classes * 4  # KD: fp32 logits only
    for batch in batches[1:]:
        module.step.outputs(batch, with_teacher=True)
    assert calls[0] == filled and len(batches) > 1


def test_a_short_run_gives_the_same_metrics_cached_or_not(make_cfg):
    uncached, _ = train(make_cfg(run="uncached"))
    cached, objects = train(make_cfg("perf.cache_teacher=true", run="cached"))
    assert objects["module"].step.teacher_cache.filled
    assert_same_results(uncached, cached, abs_tol=1e-5)


def test_the_cache_is_refused_with_augmentation(make_cfg):
    cfg = make_cfg("perf.cache_teacher=true", "data.augment={_target_:kd_lab.data.SignalAugment,max_shift:2}")
    with pytest.raises(KDLabError, match=r"SignalAugment.*data\.augment=null.*perf\.cache_teacher=false"):
        train(cfg)


def test_the_cache_is_refused_for_a_teacher_that_learns(make_cfg):
    cfg = make_cfg("perf.cache_teacher=true", "scheme=online")
    with pytest.raises(KDLabError, match=r"trains the teacher.*perf\.cache_teacher=false"):
        build_run_module(cfg)


@pytest.mark.slow
def test_ddp_ranks_each_cache_and_match_the_uncached_run(tmp_path):
    """trainer=ddp_cpu (2 processes): every rank fills its own cache and reads the rows of its shard."""
    import json

    from helpers import TINY, run_kd_lab

    results = {}
    for cached in ("false", "true"):
        run = tmp_path / f"cache-{cached}"
        run_kd_lab(tmp_path, *TINY, "trainer=ddp_cpu", "logger=none", f"perf.cache_teacher={cached}",
                   f"hydra.run.dir={run}", timeout=240)  # fmt: skip
        results[cached] = json.loads((run / "results.json").read_text())
    for log in ("train.log", "ddp_rank_1.log"):  # both ranks filled a cache of every training sample
        assert "teacher cache: 192 samples, 1 teacher(s)" in (tmp_path / "cache-true" / log).read_text()
    assert results["true"]["world_size"] == 2
    assert_same_results(results["false"], results["true"], abs_tol=1e-5, protocols=("best",))
