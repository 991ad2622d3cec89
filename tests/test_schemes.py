"""Schemes: online (the teacher learns), codistillation cohorts, self-distillation (multi-exit, born-again)
and teacher-assistant chains; their invariants and losses."""

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import step_outputs

from kd_lab.algorithms import BYOT, BuildContext, Codistillation, StepOutputs
from kd_lab.core.recorder import probe_shapes, record
from kd_lab.core.tasks import Classification
from kd_lab.errors import KDLabError
from kd_lab.models import CNN1d
from kd_lab.run.train import train
from kd_lab.schemes import Online
from kd_lab.tools.exits import export_exit

CNN_TEACHER = ["teacher=cnn1d_large", "teacher.model.channels=[8,16,16]"]


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# -- online ------------------------------------------------------------------------------------------------
def test_online_teacher_learns_and_is_checkpointed(make_cfg, tmp_path):
    cfg = make_cfg(*CNN_TEACHER, "scheme=online", "algorithm=kd", "trainer.max_epochs=1", "logger=csv")
    results, objs = train(cfg)
    module = objs["module"]
    assert any(n.startswith("teachers.0.") for n, _ in module.named_parameters())  # optimized with the student
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(k.startswith("teachers.0.") for k in ckpt["state_dict"])
    assert results["teacher"]["source"] == "online"
    for key in ("teacher/test/acc", "ensemble/test/acc", "test/teacher_acc"):
        assert 0.0 <= results["best"][key] <= 1.0
    (metrics_csv,) = (tmp_path / "run").rglob("metrics.csv")
    header = metrics_csv.read_text().splitlines()[0].split(",")
    assert {"train/loss_teacher_ce", "train/loss_kd", "teacher/val/acc", "ensemble/val/acc"} <= set(header)


def _online_teacher_before_and_after(cfg, monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The online teacher's parameters when the module is built and after ``train(cfg)``."""
    import kd_lab.run.assemble as assemble

    original, before = assemble.build_module, []

    def spy(*args, **kwargs):
        module = original(*args, **kwargs)
        before.extend(_params(module.teachers[0]))
        return module

    monkeypatch.setattr(assemble, "build_module", spy)
    _, objs = train(cfg)
    return before, _params(objs["module"].teachers[0])


def test_online_teacher_parameters_change(make_cfg, monkeypatch):
    cfg = make_cfg(*CNN_TEACHER, "scheme=online", "algorithm=kd", "debug=fdr")
    before, after = _online_teacher_before_and_after(cfg, monkeypatch)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_online_algorithm_terms_never_reach_the_teacher(make_cfg, monkeypatch):
    """With the teacher's own terms off, KD (which sees detached teacher outputs) leaves it untouched."""
    cfg = make_cfg(*CNN_TEACHER, "scheme=online", "algorithm=kd", "scheme.teacher_ce_weight=0", "debug=fdr")
    before, after = _online_teacher_before_and_after(cfg, monkeypatch)
    assert before and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_online_teacher_terms_golden():
    # teacher logits [ln 3, 0] vs label 0: CE = -ln(3/4); student [0, 0] detached: KD(T=1) of teacher toward it
    z_t = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    z_s = torch.tensor([[0.0, 0.0]], requires_grad=True)
    out = step_outputs(logits=z_s, batch={"target": torch.tensor([0])}, live_teacher_logits=[z_t])
    terms = Online(teacher_ce_weight=2.0, teacher_kd_weight=0.5, temperature=1.0).teacher_terms(out)
    assert terms["teacher_ce"].item() == pytest.approx(-2.0 * math.log(0.75), rel=1e-6)
    # KL(p_s || p_t) with p_s = [1/2, 1/2], p_t = [3/4, 1/4]
    expected_kd = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert terms["teacher_kd"].item() == pytest.approx(expected_kd, rel=1e-6)
    sum(terms.values()).backward()
    assert z_t.grad is not None and z_t.grad.abs().sum() > 0
    assert z_s.grad is None  # the student is only a target of the teacher's terms


def test_online_rejects_negative_weights():
    with pytest.raises(KDLabError, match="scheme=online needs teacher_ce_weight >= 0"):
        Online(teacher_ce_weight=-1.0)


# -- codistillation --------------------------------------------------------------------------------------
def _cohort_outputs(logits: list[torch.Tensor], target: torch.Tensor) -> StepOutputs:
    return step_outputs(logits=logits[0], batch={"target": target, "input": torch.zeros(len(target), 1)},
                       live_teacher_logits=logits[1:])  # fmt: skip


def test_codistillation_loss_golden_and_gradients():
    torch.manual_seed(0)
    z = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3])
    algo = Codistillation(peers=3, ce_weight=1.0, kl_weight=0.5, temperature=2.0)
    algo.bind(torch.nn.Identity(), None)
    algo.bind_teachers([torch.nn.Identity(), torch.nn.Identity()])
    algo.build({}, {}, BuildContext(Classification(5), 0))
    terms = algo(_cohort_outputs(z, y))
    assert set(terms) == {"ce", "kl", "peer1_ce", "peer1_kl", "peer2_ce", "peer2_kl"}

    # peer 1: CE on its labels, and the mean of T^2 KL(p_j || p_1) over j = 0, 2, computed by hand
    def kl_hand(target, student, t):
        p, log_q = F.softmax(target / t, -1), F.log_softmax(student / t, -1)
        return (p * (p.log() - log_q)).sum(-1).mean() * t * t

    expected = 0.5 * (kl_hand(z[0], z[1], 2.0) + kl_hand(z[2], z[1], 2.0)) / 2
    assert terms["peer1_kl"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["peer1_ce"].item() == pytest.approx(F.cross_entropy(z[1], y).item(), rel=1e-6)
    # each peer learns only from its own terms: the targets are detached
    grads = torch.autograd.grad(terms["peer1_kl"], z, allow_unused=True)
    assert grads[0] is None and grads[2] is None and grads[1].abs().sum() > 0
    zd = [t.detach().double() for t in z]  # the cohort's own term, not just kd_loss (test_losses checks that)
    assert torch.autograd.gradcheck(
        lambda a: algo(_cohort_outputs([zd[0], a, zd[2]], y))["peer1_kl"], (zd[1].clone().requires_grad_(),)
    )


def test_codistillation_needs_online(make_cfg):
    with pytest.raises(KDLabError, match=r"algorithm 'codistillation' cannot run under scheme 'offline'.*online"):
        train(make_cfg("algorithm=codistillation", "debug=fdr"))


def test_codistillation_cohort_reports_every_peer(make_cfg):
    cfg = make_cfg("scheme=online", "algorithm=codistillation", "algorithm.peers=3",
                   "algorithm.peer_models=[mlp_small,mlp_medium]", "debug=fdr")  # fmt: skip
    results, objs = train(cfg)
    module = objs["module"]
    assert [type(t).__name__ for t in module.teachers] == ["MLP", "MLP"]
    assert module.teachers[1].layers[0][0].out_features == 256  # mlp_medium, a different architecture
    # peer 1 has the student's architecture but its own initialization
    student, peer = objs["module"].student, module.teachers[0]
    assert not torch.equal(student.head.weight, peer.head.weight)
    for key in ("test/acc", "peer1/test/acc", "peer2/test/acc", "ensemble/test/acc"):
        assert 0.0 <= results["best"][key] <= 1.0


def test_codistillation_stale_copies_refresh_every_k_steps():
    student, peer = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    algo = Codistillation(peers=2, stale_every=2)
    algo.bind(student, None)
    algo.bind_teachers([peer])
    algo.build({}, {}, BuildContext(Classification(4), 0))
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    opt = torch.optim.SGD([*student.parameters(), *peer.parameters()], lr=0.5)
    refreshed = None
    for step in range(5):
        live = student.weight.detach().clone()
        out = step_outputs(logits=student(x), batch={"input": x, "target": y}, live_teacher_logits=[peer(x)])
        sum(algo(out).values()).backward()
        if step % 2 == 0:  # refreshed from the live weights at steps 0, 2, 4
            refreshed = live
        torch.testing.assert_close(algo.stale[0].weight, refreshed, rtol=0, atol=0)
        opt.step()
        opt.zero_grad()
        assert not torch.equal(student.weight, refreshed)  # the live model moved on; the copy did not
    assert not algo.stale[0].weight.requires_grad and int(algo.steps) == 5


def test_codistillation_stale_phase_follows_a_loaded_step_count():
    """The refresh phase counts on the host; loading a checkpoint's step count (a resume) resets it."""
    student, peer = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    algo = Codistillation(peers=2, stale_every=2)
    algo.bind(student, None)
    algo.bind_teachers([peer])
    algo.build({}, {}, BuildContext(Classification(4), 0))
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))

    def step() -> None:
        algo(step_outputs(logits=student(x), batch={"input": x, "target": y}, live_teacher_logits=[peer(x)]))

    step()  # step 0: refreshed; the host count is now 1
    algo.load_state_dict({**algo.state_dict(), "steps": torch.tensor(4)})  # as a resume at step 4 would
    with torch.no_grad():
        student.weight.add_(1.0)
    step()  # step 4: refreshed (a stale count of 1 would not refresh)
    refreshed = student.weight.detach().clone()
    torch.testing.assert_close(algo.stale[0].weight, refreshed, rtol=0, atol=0)
    with torch.no_grad():
        student.weight.add_(1.0)
    step()  # step 5: not refreshed
    torch.testing.assert_close(algo.stale[0].weight, refreshed, rtol=0, atol=0)


# -- self-distillation: multi-exit (BYOT) ------------------------------------------------------------------
def _byot(student: torch.nn.Module, x: torch.Tensor, **kwargs) -> BYOT:
    algo = BYOT(**kwargs)
    algo.bind(student, None)
    algo.build(probe_shapes(student, algo.student_taps, x), {}, BuildContext(Classification(10), 0))
    return algo


def test_byot_loss_golden_and_gradients():
    torch.manual_seed(0)
    student = CNN1d((1, 40), 10, channels=(4, 6, 8))
    x, y = torch.randn(5, 1, 40), torch.randint(0, 10, (5,))
    algo = _byot(student, x, ce_weight=0.9, kd_weight=0.1, hint_weight=0.05, temperature=3.0)
    logits, feats = record(student, algo.student_taps, x)
    terms = algo(step_outputs(logits=logits, batch={"target": y}, features=feats))
    # by hand: exits at blocks.0 and blocks.1, each bottleneck -> classifier, against the deepest output
    deep, embedding = logits.detach(), feats["pool"].flatten(1).detach()
    ce, kd, hint = 0.0, 0.0, 0.0
    for path, head in zip(["blocks.0", "blocks.1"], algo.heads, strict=True):
        f = head[0](feats[path])
        z = head[1](f)
        ce += F.cross_entropy(z, y)
        p = F.softmax(deep / 3, -1)
        kd += (p * (p.log() - F.log_softmax(z / 3, -1))).sum(-1).mean() * 9
        hint += ((f - embedding) ** 2).mean()
    assert terms["ce"].item() == pytest.approx(0.9 * F.cross_entropy(logits, y).item(), rel=1e-5)
    assert terms["exit_ce"].item() == pytest.approx(0.9 * ce.item(), rel=1e-5)
    assert terms["exit_kd"].item() == pytest.approx(0.1 * kd.item(), rel=1e-5)
    assert terms["exit_hint"].item() == pytest.approx(0.05 * hint.item(), rel=1e-5)
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in algo.heads.parameters() if p.ndim > 1)
    assert student.blocks[0][0].weight.grad.abs().sum() > 0  # the exits' losses train the backbone too


def test_byot_exported_exit_matches_the_multi_exit_network():
    torch.manual_seed(0)
    student = CNN1d((1, 40), 10, channels=(4, 6, 8)).eval()
    x = torch.randn(3, 1, 40)
    algo = _byot(student, x).eval()
    _, feats = record(student, algo.student_taps, x)
    inside = algo.exit_logits(feats)
    for name in ("exit1", "exit2"):
        exported = export_exit(student, algo, name)
        torch.testing.assert_close(exported(x), inside[name], rtol=0, atol=0)
        head = algo.heads[int(name[-1]) - 1]  # the exit's own head only: the other heads are dropped
        assert sum(p.numel() for p in exported.parameters()) == sum(
            p.numel() for m in (student, head) for p in m.parameters()
        )
    torch.testing.assert_close(export_exit(student, algo, "student")(x), student(x))
    with pytest.raises(KeyError, match="exit9"):
        export_exit(student, algo, "exit9")


def test_byot_run_reports_each_exit_and_its_cost(make_cfg):
    results, _ = train(make_cfg("scheme=self", "algorithm=byot", "student=cnn1d_tiny", "debug=fdr"))
    exits = results["algorithm"]["exits"]
    assert list(exits) == ["exit1", "exit2", "student"]
    assert exits["exit1"]["flops"] < exits["exit2"]["flops"] < exits["student"]["flops"]
    assert exits["exit1"]["params"] < exits["student"]["params"]
    assert results["names"].get("teacher") is None  # no teacher config applies under scheme=self
    for key in ("exit1/test/acc", "exit2/test/acc", "ensemble/test/acc"):
        assert 0.0 <= results["best"][key] <= 1.0


def test_export_exit_cli_writes_a_plain_model(make_cfg, tmp_path, capsys):
    from kd_lab.tools.export import load_run, main

    train(make_cfg("scheme=self", "algorithm=byot", "student=cnn1d_tiny", "trainer.max_epochs=1"))
    main([str(tmp_path / "run"), "--exit", "exit1", "--out", str(tmp_path / "exit1.pt")])
    assert "parameters used" in capsys.readouterr().out
    plain = torch.jit.load(str(tmp_path / "exit1.pt"))
    module, datamodule = load_run(tmp_path / "run")
    module.eval()
    x = datamodule.example_input("input")
    with module.step.student_recorder:
        module.student(x)
    inside = module.algorithm.exit_logits(module.step.student_recorder.features)["exit1"]
    torch.testing.assert_close(plain(x), inside)


# -- chains: teacher assistant, born-again ---------------------------------------------------------------
def test_teacher_assistant_chain_caches_stages_and_resumes(make_cfg, tmp_path):
    overrides = ("chain=teacher_assistant", "chain.assistants=[mlp_medium,mlp_small]", "student=mlp_small",
                 "debug=fdr")  # fmt: skip
    first, _ = train(make_cfg(*overrides))
    assert [(s["stage"], s["reused"]) for s in first["chain"]] == [
        ("assistant1-mlp_medium", False),
        ("assistant2-mlp_small", False),
    ]
    second, _ = train(make_cfg(*overrides, run="again"))
    assert [s["reused"] for s in second["chain"]] == [True, True]
    # the run's teacher is the last assistant, loaded from its cache entry
    assert second["teacher"]["source"] == "checkpoint" and second["teacher"]["name"] == "mlp_small"
    assert second["names"]["chain"] == "teacher_assistant"
    # an interrupted chain: the second stage never finished (only its staging directory exists)
    last = second["chain"][1]["path"]
    shutil.move(last, Path(last).with_name("." + Path(last).name + ".tmp-killed"))
    third, _ = train(make_cfg(*overrides, run="resumed"))
    assert [s["reused"] for s in third["chain"]] == [True, False]  # resumes at the first unfinished stage


def test_born_again_generations(make_cfg):
    results, objs = train(make_cfg("chain=born_again", "chain.generations=2", "debug=fdr"))
    assert [s["stage"] for s in results["chain"]] == ["gen0-mlp_small", "gen1-mlp_small"]
    assert results["chain"][0]["metrics"]["test/acc"] >= 0.0
    # the run's teacher is generation 1: same architecture, frozen, weights from its cache entry
    teacher = objs["teacher"]
    assert type(teacher) is type(objs["module"].student) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    gen1 = torch.load(results["chain"][1]["path"] + "/teacher.pt", weights_only=True)
    torch.testing.assert_close(teacher.state_dict(), gen1)


def test_a_multi_exit_run_checkpoint_is_a_teacher(make_cfg, tmp_path):
    """A kd-lab checkpoint holds the exits' heads beside the student: as a teacher, only the student loads."""
    train(make_cfg("scheme=self", "algorithm=byot", "student=cnn1d_tiny", "trainer.max_epochs=1", run="byot"))
    ckpt = tmp_path / "byot" / "checkpoints" / "best.ckpt"
    results, objs = train(make_cfg("teacher=cnn1d_large", "teacher.model.channels=[8,8,8]",
                                   f"teacher.ckpt_path={ckpt}", "debug=fdr"))  # fmt: skip
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    torch.testing.assert_close(objs["teacher"].head.weight, saved["student.head.weight"])
    assert results["teacher"]["source"] == "checkpoint"
