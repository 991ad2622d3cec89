"""The perf switches (conf/perf, docs/performance.md) run on CPU and leave the run's math alone: bf16 mixed
precision, channels_last for 2-D CNNs, the teacher in inference mode, a deferred non-finite check, compile."""

import json

import pytest
import torch
from helpers import build_run_module

from kd_lab.core.step import StepPlan
from kd_lab.errors import KDLabError
from kd_lab.run.train import train

IMAGES = ["data.input_shape=[1,8,8]", "teacher=cnn2d_large", "student=cnn2d_small"]
FAST_DEV = ["+trainer.fast_dev_run=true"]


def test_bf16_mixed_precision_runs(make_cfg):
    results, _ = train(make_cfg("trainer.precision=bf16-mixed", *FAST_DEV))
    assert results["status"] == "finished"


def test_channels_last_formats_models_and_image_batches(make_cfg):
    results, objects = train(make_cfg(*IMAGES, "perf.channels_last=true", *FAST_DEV))
    module = objects["module"]
    assert results["status"] == "finished" and module.step.plan.channels_last
    for model in (module.student, module.teacher):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = module.step.model_input({"input": torch.randn(2, 3, 8, 8)}, "input")  # 3 channels: NHWC != NCHW
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@pytest.mark.parametrize("algorithm", ["kd", "fitnet"])
def test_teacher_inference_mode_gives_the_no_grad_loss_and_trains(make_cfg, algorithm):
    cfg = make_cfg(f"algorithm={algorithm}", "perf.teacher_inference_mode=true")
    module, datamodule = build_run_module(cfg)
    batch = next(iter(datamodule.train_dataloader()))
    inference = module.step.training_terms(batch)
    sum(inference.values()).backward()  # inference tensors saved for backward would raise here
    module.step.plan = StepPlan(teacher_inference_mode=False)
    no_grad = module.step.training_terms(batch)
    assert {k: float(v.detach()) for k, v in inference.items()} == {k: float(v.detach()) for k, v in no_grad.items()}
    results, _ = train(cfg)
    assert results["status"] == "finished"


def test_a_deferred_finite_check_still_stops_before_the_next_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(
        "algorithm=none",
        "algorithm._target_=helpers.NaNAfter",
        "+algorithm.after=8",
        "callbacks=default",
        "perf.check_finite_every=1000",  # only the end-of-epoch check can catch it
    )
    with pytest.raises(KDLabError, match=r"non-finite loss at epoch 2, step 8: term\(s\) \['exploding'\]"):
        train(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 0  # the second epoch's NaN weights never reached a checkpoint (Lightning counts from 0)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_compile_runs_and_keeps_checkpoint_keys(make_cfg):
    # the eager backend traces the models with TorchDynamo without generating code: seconds, not minutes
    results, objects = train(make_cfg("perf.compile=true", "perf.compile_backend=eager", *FAST_DEV))
    assert results["status"] == "finished"
    module = objects["module"]
    assert not any("_orig_mod" in key for key in module.state_dict())  # compiled in place: checkpoint keys kept
    assert module.student._compiled_call_impl is not None and module.teacher._compiled_call_impl is not None


@pytest.mark.slow
def test_compile_with_inductor_runs(make_cfg):
    results, _ = train(make_cfg("perf.compile=true", *FAST_DEV))
    assert results["status"] == "finished"


def test_a_misspelt_perf_key_is_an_error(make_cfg):
    with pytest.raises(KDLabError, match=r"unknown key perf\.cache_teachr=True: .* did you mean perf\.cache_teacher\?"):
        train(make_cfg("+perf.cache_teachr=true"))
