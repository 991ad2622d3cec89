"""Graph distillation (GLNN): the CSBM data and its splits, the GCN teacher, the GLNN loss, a run end to end,
and the refusals before compute."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from kd_lab.algorithms.base import StepOutputs
from kd_lab.algorithms.glnn import GLNN, glnn_loss, labelled_cross_entropy
from kd_lab.algorithms.kd import KD
from kd_lab.core.tasks.classification import Classification, cross_entropy
from kd_lab.data.graph import FULL, IGNORE, OBSERVED, CSBMDataModule
from kd_lab.errors import KDLabError
from kd_lab.models.gnn import GCN, normalized_adjacency
from kd_lab.models.mlp import MLP
from kd_lab.run.outcome import user_error
from kd_lab.run.train import train

SMALL = {"num_nodes": 300, "p_in": 0.06, "p_out": 0.006, "train_per_class": 4, "val_per_class": 6}
GRAPH_RUN = ["data=csbm", "data.num_nodes=300", "teacher=gcn", "student=mlp_graph", "debug=fdr"]


def datamodule(tmp_path, **overrides) -> CSBMDataModule:
    dm = CSBMDataModule(data_dir=str(tmp_path), **{**SMALL, **overrides})
    dm.setup()
    return dm


# -- data ----------------------------------------------------------------------------------------------------
def test_csbm_is_cached_and_keyed_by_its_parameters(tmp_path):
    a = datamodule(tmp_path)
    assert a.cache_file.is_file()
    again = datamodule(tmp_path)  # read from the cache file
    assert torch.equal(a.graph.features, again.graph.features) and torch.equal(a.graph.edges, again.graph.edges)
    other = datamodule(tmp_path, p_in=0.05)
    assert other.cache_file != a.cache_file and not torch.equal(other.graph.edges, a.graph.edges)


def test_csbm_edges_follow_the_communities(tmp_path):
    g = datamodule(tmp_path, num_nodes=600).graph
    same = (g.labels[g.edges[0]] == g.labels[g.edges[1]]).float().mean()
    # p_in = 10 p_out with 5 classes: 10 / (10 + 4) of the edges join nodes of one class
    assert abs(same - 10 / 14) < 0.06
    assert (g.edges[0] < g.edges[1]).all()  # each undirected edge once, no self-loop


def test_transductive_split_distills_on_every_node(tmp_path):
    dm = datamodule(tmp_path)
    train = dm.splits["train"]
    assert len(train["target"]) == 300 == dm.batch_size  # every node, full batch
    labelled = train["target"] != IGNORE
    assert labelled.sum() == 5 * 4  # train_per_class nodes per class keep a label
    assert torch.equal(train["target"][labelled], dm.graph.labels[train["teacher_input"][labelled, 0]])
    assert (dm.splits["test"]["teacher_input"][:, 1] == OBSERVED).all()  # the test nodes are in the graph
    assert len(dm.splits["val"]["target"]) == 5 * 6


def test_inductive_split_holds_test_nodes_out(tmp_path):
    dm = datamodule(tmp_path, setting="inductive")
    g = dm.graph
    test_nodes = dm.splits["test"]["teacher_input"][:, 0]
    assert g.held_out[test_nodes].all() and g.held_out.sum() == len(test_nodes)
    assert not torch.isin(dm.splits["train"]["teacher_input"][:, 0], test_nodes).any()
    assert (dm.splits["test"]["teacher_input"][:, 1] == FULL).all()  # the GNN sees them in the whole graph
    assert len(test_nodes) == round(0.2 * (300 - 5 * (4 + 6)))


def test_label_loss_sees_the_labelled_nodes_only(tmp_path):
    dm = datamodule(tmp_path)
    batch = dm.splits["train"]
    logits = torch.randn(len(batch["target"]), 5)
    labelled = batch["target"] != IGNORE
    expected = F.cross_entropy(logits[labelled], batch["target"][labelled])
    assert torch.allclose(cross_entropy(logits, batch), expected)  # what algorithm=none and kd train on


# -- the GCN -------------------------------------------------------------------------------------------------
def test_normalized_adjacency_golden():
    # the path 0 - 1 - 2 with self-loops: degrees 2, 3, 2, so A_hat[i, j] = 1 / sqrt(d_i d_j)
    a = normalized_adjacency(torch.tensor([[0, 1], [1, 2]]), 3).to_dense()
    s6 = 1 / math.sqrt(6)
    expected = torch.tensor([[1 / 2, s6, 0], [s6, 1 / 3, s6], [0, s6, 1 / 2]])
    assert torch.allclose(a, expected)
    # node 2 dropped: its edge goes, its self-loop stays
    kept = normalized_adjacency(torch.tensor([[0, 1], [1, 2]]), 3, keep=torch.tensor([True, True, False]))
    assert torch.allclose(kept.to_dense(), torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]]))


def test_gcn_propagation_gradcheck():
    torch.manual_seed(0)
    gcn = GCN((4,), 3, hidden=(5,), dropout=0.0).double()
    adjacency = normalized_adjacency(torch.tensor([[0, 1, 2], [1, 2, 3]]), 4).double()
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: gcn.propagate(adjacency, f), (x,))


def test_inductive_training_view_ignores_held_out_nodes(tmp_path):
    dm = datamodule(tmp_path, setting="inductive")
    gcn = GCN((32,), 5).eval()
    gcn.bind_data(dm)
    train_rows = dm.splits["train"]["teacher_input"]
    before = gcn(train_rows)
    full_rows = train_rows.clone()
    full_rows[:, 1] = FULL
    full_before = gcn(full_rows)
    gcn.features[dm.graph.held_out] += 5.0  # the held-out nodes change
    assert torch.allclose(gcn(train_rows), before)  # the training graph does not see them
    assert not torch.allclose(gcn(full_rows), full_before)  # the whole graph does


def test_gcn_checkpoint_holds_the_weights_only(tmp_path):
    gcn = GCN((32,), 5)
    gcn.bind_data(datamodule(tmp_path))
    assert set(gcn.state_dict()) == {f"layers.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}


# -- the GLNN loss -------------------------------------------------------------------------------------------
def test_glnn_loss_golden():
    # node 0 unlabelled, student = teacher (KL 0); node 1 labelled class 0, student softmax (3/4, 1/4), teacher
    # (1/2, 1/2): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); batchmean over 2 nodes: 1/4 ln(4/3).
    # CE over the labelled node: -ln(3/4) = ln(4/3).
    s = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    t = torch.zeros(2, 2)
    terms = glnn_loss(s, t, torch.tensor([IGNORE, 0]), lam=0.5, temperature=1.0)
    ln = math.log(4 / 3)
    assert terms["ce"].item() == pytest.approx(0.5 * ln)
    assert terms["kd"].item() == pytest.approx(0.5 * ln / 4)
    assert set(glnn_loss(s, t, torch.tensor([IGNORE, 0]), lam=0.0)) == {"kd"}  # GLNN's default: soft labels only


def test_glnn_loss_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 4, dtype=torch.float64)
    target = torch.tensor([0, IGNORE, 3, IGNORE, IGNORE, 1])

    def loss(x):
        return sum(glnn_loss(x, t, target, lam=0.3, temperature=2.0).values())

    assert torch.autograd.gradcheck(loss, (s,))


def test_no_labelled_node_gives_a_zero_label_loss():
    s = torch.randn(3, 4, requires_grad=True)
    loss = labelled_cross_entropy(s, torch.full((3,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros(3, 4))


# -- runs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", ["csbm", "csbm_inductive"])
def test_glnn_fast_dev_run(make_cfg, data):
    results, objs = train(make_cfg(*GRAPH_RUN, f"data={data}", "algorithm=glnn"))
    assert results["status"] == "finished" and objs["trainer"].fast_dev_run
    assert 0.0 <= results["best"]["test/acc"] <= 1.0 and "test/teacher_acc" in results["best"]


# -- refusals, before any compute ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=fake", "teacher=gcn", "algorithm=kd"], r"the GCN teacher needs graph data.*data=csbm"),
        (["algorithm=glnn"], r"algorithm=glnn distills a graph neural network into an MLP.*teacher=gcn data=csbm"),
        (
            [*GRAPH_RUN, "student.model._target_=kd_lab.models.gnn.GCN", "algorithm=kd"],
            r"the GCN reads \[node, view\] rows.*pick an MLP student",
        ),
        ([*GRAPH_RUN, "algorithm=glnn", "data.batch_size=64"], r"graph data trains full-batch.*batch_size=null"),
        ([*GRAPH_RUN, "algorithm=glnn", "data.setting=semi"], r"data.setting='semi' is not one of"),
        ([*GRAPH_RUN, "algorithm=glnn", "algorithm.lam=1.5"], r"algorithm.lam=1.5 is out of range"),
    ],
)
def test_invalid_uses_fail_before_compute(make_cfg, tmp_path, overrides, message):
    with pytest.raises(Exception) as caught:  # Hydra wraps a constructor's error: the KDLabError is its cause
        train(make_cfg("debug=fdr", *overrides))
    error = user_error(caught.value)
    assert error is not None and re.search(message, str(error)), caught.value
    assert not (tmp_path / "teachers").exists()  # no teacher was trained


def test_glnn_refuses_a_teacher_that_is_not_a_graph_model():
    with pytest.raises(KDLabError, match=r"the teacher is MLP: use a GNN teacher"):
        GLNN().bind(MLP((4,), 2), MLP((4,), 2))


def test_gcn_without_a_graph_says_how_to_bind_one():
    with pytest.raises(KDLabError, match=r"the GCN has no graph yet.*bind_data"):
        GCN((4,), 2)(torch.zeros(2, 2, dtype=torch.long))


# -- the benchmark -------------------------------------------------------------------------------------------
def test_bench_glnn_prints_both_times_and_the_ratio(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "bench_glnn.py"
    spec = importlib.util.spec_from_file_location("bench_glnn", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--nodes", "300", "--reps", "2"])
    out = capsys.readouterr().out
    assert "GCN" in out and "MLP" in out and "speed-up of the MLP" in out
    assert report["ratio"] == pytest.approx(report["gcn_ms"] / report["mlp_ms"])


def test_gcn_refuses_a_graph_or_rows_it_cannot_read(tmp_path):
    dm = datamodule(tmp_path)
    with pytest.raises(KDLabError, match=r"the GCN reads 16 features per node but the graph has 32"):
        GCN((16,), 5).bind_data(dm)
    gcn = GCN((32,), 5)
    gcn.bind_data(dm)
    with pytest.raises(KDLabError, match=r"views must be 0 \(training graph\) or 1 \(whole graph\), got \[2\]"):
        gcn(torch.tensor([[0, 2]]))
    with pytest.raises(KDLabError, match=r"teacher.model.dropout=1.0 must be in \[0, 1\)"):
        GCN((32,), 5, dropout=1.0)


def test_kd_at_glnn_weights_computes_the_glnn_loss():
    """docs/graph_distillation.md: algorithm=kd with ce_weight=lam, kd_weight=1-lam, T=1 is GLNN's loss."""
    torch.manual_seed(0)
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    batch = {"target": torch.tensor([0, IGNORE, 3, IGNORE, IGNORE, 1])}
    out = StepOutputs(logits=s, batch=batch, teacher_logits=t, task=Classification(4))
    glnn = sum(GLNN(lam=0.3)(out).values())
    kd = sum(KD(ce_weight=0.3, kd_weight=0.7, temperature=1.0)(out).values())
    assert torch.allclose(glnn, kd)
