"""Node classification on one graph: a contextual stochastic block model (CSBM; Deshpande et al., NeurIPS 2018,
arXiv:1807.09596), generated locally and cached under ``paths.data_dir``, keyed by its parameters.

    n nodes, K balanced classes (communities); an edge between two nodes with probability p_in when they
    share a class and p_out otherwise; node features x_i = mu * u_{y_i} + N(0, I_d), where u_1..u_K are
    orthonormal directions. mu sets how much the features say; p_in / p_out how much the graph says.

How a graph becomes batches (GLNN's protocol, Zhang et al., ICLR 2022, arXiv:2110.08727):
  * ``input`` is a node's features (what an MLP student reads), ``teacher_input`` is ``[node, view]`` (what a
    GNN teacher reads, ``kd_lab.models.gnn``): the GNN holds the graph and maps node ids to logits.
  * The training split is every node of the training graph. Only ``train_per_class`` nodes per class keep
    their label; the others have target ``IGNORE`` (-100, PyTorch's ignore index), so a label loss sees only
    the labelled nodes while a distillation term sees every node's soft label.
  * Validation: ``val_per_class`` labelled nodes per class. Test: the remaining nodes.
  * ``setting=transductive``: the test nodes are part of the training graph (unlabelled).
    ``setting=inductive``: a fraction ``inductive_rate`` of the test nodes, and their edges, are removed from
    the training graph (view 0); the test split is those held-out nodes, which the GNN sees in the full graph
    (view 1).
Training is full-batch: a mini-batch could hold no labelled node, and a GNN propagates over the whole graph
at every step anyway.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kd_lab.data.base import TensorDataModule, check_split
from kd_lab.errors import KDLabError
from kd_lab.utils.io import atomic_torch_save

IGNORE = -100  # the target of an unlabelled node (torch.nn.functional.cross_entropy's ignore_index)
SETTINGS = ("transductive", "inductive")
OBSERVED, FULL = 0, 1  # the graph views a teacher input names: the training graph, the whole graph
FORMAT_VERSION = 1  # bump when the generator changes, so old cache files are not reused


@dataclass(frozen=True)
class Graph:
    """One graph and its node splits (indices into the ``num_nodes`` nodes)."""

    features: Tensor  # (n, d) float
    labels: Tensor  # (n,) int64, every node's true class
    edges: Tensor  # (2, E) int64, each undirected edge once (i < j)
    train: Tensor  # labelled training nodes
    val: Tensor
    test: Tensor
    held_out: Tensor  # (n,) bool: removed from the training graph (inductive test nodes)

    @property
    def num_nodes(self) -> int:
        return len(self.labels)


def csbm(
    num_nodes: int,
    num_classes: int,
    feature_dim: int,
    p_in: float,
    p_out: float,
    mu: float,
    seed: int,
    train_per_class: int,
    val_per_class: int,
    setting: str,
    inductive_rate: float,
) -> Graph:
    """Draw a CSBM graph and its splits from ``seed`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(num_nodes) % num_classes)[torch.randperm(num_nodes, generator=g)]
    directions = torch.linalg.qr(torch.randn(feature_dim, num_classes, generator=g))[0].T  # (K, d), orthonormal
    features = mu * directions[labels] + torch.randn(num_nodes, feature_dim, generator=g)
    prob = torch.where(labels[:, None] == labels[None, :], p_in, p_out)
    upper = torch.triu(torch.rand(num_nodes, num_nodes, generator=g) < prob, diagonal=1)
    edges = upper.nonzero().T.contiguous()
    order = torch.randperm(num_nodes, generator=g)
    train = torch.cat([order[labels[order] == k][:train_per_class] for k in range(num_classes)])
    rest = order[~torch.isin(order, train)]
    val = torch.cat([rest[labels[rest] == k][:val_per_class] for k in range(num_classes)])
    test = rest[~torch.isin(rest, val)]
    held_out = torch.zeros(num_nodes, dtype=torch.bool)
    if setting == "inductive":
        test = test[torch.randperm(len(test), generator=g)][: round(inductive_rate * len(test))]
        held_out[test] = True
    return Graph(features, labels, edges, train.sort().values, val.sort().values, test.sort().values, held_out)


class CSBMDataModule(TensorDataModule):
    """A CSBM graph as node batches (module docstring). ``input_shape`` is ``[d]``, the feature dimension."""

    def __init__(
        self,
        input_shape: tuple[int, ...] = (32,),
        num_classes: int = 5,
        num_nodes: int = 2000,
        p_in: float = 0.01,
        p_out: float = 0.001,
        mu: float = 1.5,
        graph_seed: int = 0,
        train_per_class: int = 20,
        val_per_class: int = 30,
        setting: str = "transductive",
        inductive_rate: float = 0.2,
        data_dir: str = "data",
        batch_size: int | None = None,
        **kwargs,
    ):
        if batch_size is not None:
            raise KDLabError(
                f"data.batch_size={batch_size}: graph data trains full-batch (a mini-batch may hold no labelled "
                "node, and a GNN teacher propagates over the whole graph at each step); leave data.batch_size=null."
            )
        if setting not in SETTINGS:
            raise KDLabError(f"data.setting={setting!r} is not one of {SETTINGS}; GLNN reports both.")
        if len(input_shape) != 1:
            raise KDLabError(
                f"data.input_shape={list(input_shape)}: node features are vectors, so give one number, the "
                "feature dimension (e.g. data.input_shape=[32])."
            )
        if not 0 <= p_out <= 1 or not 0 <= p_in <= 1 or not 0 < inductive_rate < 1:
            raise KDLabError(
                f"data.p_in={p_in} and data.p_out={p_out} must be probabilities in [0, 1], and "
                f"data.inductive_rate={inductive_rate} in (0, 1); e.g. p_in=0.01, p_out=0.001, inductive_rate=0.2."
            )
        if num_nodes < num_classes * (train_per_class + val_per_class + 1):
            raise KDLabError(
                f"data.num_nodes={num_nodes} is too few for {num_classes} classes of {train_per_class} training "
                f"and {val_per_class} validation nodes plus test nodes: raise num_nodes or lower the per-class counts."
            )
        super().__init__(num_classes=num_classes, input_shape=input_shape, teacher_input_shape=(2,), **kwargs)
        self.batch_size = 0  # set to the number of training nodes in setup(): full batch
        self.spec = {
            "num_nodes": num_nodes,
            "num_classes": num_classes,
            "feature_dim": int(input_shape[0]),
            "p_in": float(p_in),
            "p_out": float(p_out),
            "mu": float(mu),
            "seed": graph_seed,
            "train_per_class": train_per_class,
            "val_per_class": val_per_class,
            "setting": setting,
            "inductive_rate": float(inductive_rate),
        }
        self.data_dir = Path(data_dir)
        self.graph: Graph | None = None  # set in setup(); a GNN teacher binds to it (kd_lab.models.gnn)

    @property
    def cache_file(self) -> Path:
        key = hashlib.sha1(json.dumps({"v": FORMAT_VERSION, **self.spec}, sort_keys=True).encode()).hexdigest()
        return self.data_dir / "csbm" / f"csbm-{key[:12]}.pt"

    def load_graph(self) -> Graph:
        """The cached graph of these parameters; drawn and cached on first use."""
        path = self.cache_file
        if path.is_file():
            try:
                return Graph(**torch.load(path, weights_only=True))
            except Exception as e:
                raise KDLabError(f"{path} cannot be read ({type(e).__name__}: {e}); delete it to regenerate it.") from e
        graph = csbm(**self.spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(graph.__dict__, path)
        return graph

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        graph = self.graph = self.load_graph()
        n = graph.num_nodes
        nodes = torch.arange(n)
        train_nodes = nodes[~graph.held_out]  # every node of the training graph
        target = torch.full((n,), IGNORE, dtype=torch.long)
        target[graph.train] = graph.labels[graph.train]
        check_split("train (labelled nodes)", graph.features[graph.train], graph.labels[graph.train], *self._shape())
        test_view = FULL if graph.held_out.any() else OBSERVED
        for name, idx, labels, view in (
            ("train", train_nodes, target[train_nodes], OBSERVED),
            ("val", graph.val, graph.labels[graph.val], OBSERVED),
            ("test", graph.test, graph.labels[graph.test], test_view),
        ):
            if name != "train":
                check_split(name, graph.features[idx], labels, *self._shape())
            self.splits[name] = {
                "input": graph.features[idx],
                "target": labels,
                "index": torch.arange(len(idx)),
                "teacher_input": torch.stack([idx, torch.full_like(idx, view)], dim=1),
            }
        self.batch_size = len(train_nodes)

    def _shape(self) -> tuple[int, tuple[int, ...]]:
        return self.num_classes, self.input_shape
