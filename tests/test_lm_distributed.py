"""Language modeling on more than one process (docs/language-models.md): the token normalization under DDP,
a ``trainer=ddp_cpu`` run end to end, and what FSDP does on CPU (Lightning refuses it)."""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import run_kd_lab
from hydra.errors import InstantiationException
from test_lm import LM_TINY

from kd_lab.algorithms import TokenKD
from kd_lab.algorithms.base import StepOutputs
from kd_lab.core.tasks import LanguageModeling
from kd_lab.losses.divergences import KINDS
from kd_lab.run.train import train

VOCAB, TOKENS, WORLD = 50, 8, 2
# positions set to -100 in each row of the global batch of 4: rank 0 gets rows 0-1 (13 valid tokens), rank 1
# rows 2-3 (7 valid): different counts per rank, so a per-rank mean would weigh the ranks' tokens unequally
IGNORED = {0: [0, 1], 1: [2], 2: [0, 1, 2, 3, 4], 3: [3, 4, 5, 6]}


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (4, TOKENS + 1), generator=g)
    target = tokens[:, 1:].clone()
    for row, cols in IGNORED.items():
        target[row, cols] = -100
    return {"input": tokens[:, :-1].contiguous(), "target": target, "index": torch.arange(4)}


def models():
    from kd_lab.models.hf import causal_lm

    torch.manual_seed(0)
    student = causal_lm("gpt2", VOCAB, TOKENS, hidden_size=16, num_layers=1, num_heads=2)
    teacher = causal_lm("gpt2", VOCAB, TOKENS, hidden_size=32, num_layers=1, num_heads=2).requires_grad_(False)
    return student, teacher


def losses_and_grads(batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
    """``{name: (loss, student gradients)}`` on ``batch``: the task's label loss, and each TokenKD divergence
    with ce_weight 0.5. Under DDP the gradients are all-reduced and averaged, as DDP's backward does."""
    task, (student, teacher) = LanguageModeling(vocab_size=VOCAB), models()
    teacher_logits = teacher(batch["input"]).logits
    out = {}
    for name in ["label_loss", *KINDS]:
        student.zero_grad(set_to_none=True)
        logits = student(batch["input"]).logits
        if name == "label_loss":
            loss = task.label_loss(logits, batch)
        else:
            step = StepOutputs(logits=logits, batch=batch, teacher_logits=teacher_logits, task=task)
            loss = torch.stack(list(TokenKD(name, ce_weight=0.5)(step).values())).sum()
        loss.backward()
        grads = [p.grad.clone() for p in student.parameters()]
        if dist.is_initialized():
            for g in grads:
                dist.all_reduce(g)
                g /= dist.get_world_size()
        out[name] = (loss.detach(), grads)
    return out


def rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        half = {k: v[2 * rank : 2 * rank + 2] for k, v in global_batch().items()}
        torch.save(losses_and_grads(half), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ddp_ranks_give_the_loss_and_gradients_of_one_process(tmp_path):
    """Each rank divides its sum over valid tokens by the global count / world size; DDP averages the
    gradients: the result is one process on the whole batch, though the ranks hold 13 and 7 valid tokens."""
    batch = global_batch()
    counts = [int((batch["target"][2 * r : 2 * r + 2] != -100).sum()) for r in range(WORLD)]
    assert counts == [13, 7]
    mp.spawn(rank_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = losses_and_grads(batch)
    # the control: per-rank means (what dividing by the local count gives) would not average to it
    local = [losses_and_grads({k: v[2 * r : 2 * r + 2] for k, v in batch.items()}) for r in range(WORLD)]
    assert abs(sum(h["label_loss"][0] for h in local) / WORLD - single["label_loss"][0]) > 1e-3
    for name, (loss, grads) in single.items():
        mean_loss = sum(r[name][0] for r in ranks) / WORLD  # what DDP's gradient is the gradient of
        torch.testing.assert_close(mean_loss, loss, rtol=0, atol=1e-6, msg=name)
        for r in ranks:  # every rank holds the same averaged gradient
            for g_rank, g in zip(r[name][1], grads, strict=True):
                torch.testing.assert_close(g_rank, g, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_ddp_cpu_lm_run_end_to_end(tmp_path):
    limits = ["+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"]
    run_kd_lab(tmp_path, *LM_TINY, *limits, "trainer=ddp_cpu", timeout=600)
    (run,) = (tmp_path / "logs" / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["world_size"] == 2
    assert (run / "ddp_rank_1.log").is_file()
    for protocol in ("best", "last"):
        assert results[protocol]["test/ppl"] > 1.0 and 0.0 <= results[protocol]["test/agreement"] <= 1.0
    assert results["report"]["generation"]["student"]["tokens_per_second"] > 0  # rank zero measured it


FSDP_REFUSAL = (
    "The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`. Please set "
    "`accelerator='cuda'`, `accelerator='gpu'`, or pass a `CUDAAccelerator()` instance to use FSDP."
)


def test_lightning_refuses_fsdp_on_cpu(make_cfg, tmp_path):
    """Lightning 2.6's accelerator connector refuses ``strategy=fsdp`` unless the accelerator is CUDA, so FSDP
    cannot be tested on CPU here. kd-lab does not check it before compute: the refusal comes when the teacher
    store builds its Trainer, wrapped by Hydra, before any training (the store holds only its lock file)."""
    cfg = make_cfg(*LM_TINY, "debug=fdr", "trainer=ddp_cpu", "trainer.strategy=fsdp", fast=False)
    with pytest.raises(InstantiationException) as caught:
        train(cfg)
    assert isinstance(caught.value.__cause__, ValueError) and str(caught.value.__cause__) == FSDP_REFUSAL
    assert not list((tmp_path / "teachers").glob("*/meta.json"))  # no teacher was trained
