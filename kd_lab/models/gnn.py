"""A graph convolutional network (Kipf & Welling, ICLR 2017, arXiv:1609.02907) in plain torch, as a teacher of
graph data (``kd_lab.data.graph``).

    H_{l+1} = ReLU(A_hat H_l W_l),   A_hat = D^{-1/2} (A + I) D^{-1/2}   (symmetric normalization)

The model holds its graph: node features and the normalized adjacency of each view (the training graph and
the whole graph) as buffers, taken from the data module by ``bind_data`` before the run's first forward.
They are not persistent: a checkpoint holds the weights only, and the data rebuilds the graph.
Its input is a batch of ``[node, view]`` rows (the data's ``teacher_input``). Every forward propagates over
the whole graph of each view the batch names, then gathers the batch's rows: cheap for a few thousand nodes.
"""

import itertools
from collections.abc import Sequence
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.errors import KDLabError


def normalized_adjacency(edges: Tensor, num_nodes: int, keep: Tensor | None = None) -> Tensor:
    """Sparse ``D^{-1/2} (A + I) D^{-1/2}`` of the undirected ``edges`` (2, E), each edge given once.
    ``keep``: a boolean mask of nodes; edges touching a dropped node are left out (the node keeps its self-loop)."""
    if keep is not None:
        edges = edges[:, keep[edges[0]] & keep[edges[1]]]
    loops = torch.arange(num_nodes).expand(2, -1)
    index = torch.cat([edges, edges.flip(0), loops], dim=1)
    degree = torch.zeros(num_nodes).index_add_(0, index[0], torch.ones(index.shape[1]))
    scale = degree.rsqrt()
    values = scale[index[0]] * scale[index[1]]
    return torch.sparse_coo_tensor(index, values, (num_nodes, num_nodes), check_invariants=True).coalesce()


class GCN(nn.Module):
    """``layers.<i>`` are the graph convolutions' weights; the last gives the logits."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64,), dropout: float = 0.5
    ):
        super().__init__()
        if not 0 <= dropout < 1:
            raise KDLabError(f"teacher.model.dropout={dropout} must be in [0, 1); Kipf & Welling use 0.5.")
        widths = [prod(input_shape), *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.dropout = dropout
        self.num_classes = num_classes
        self.bound = False

    def bind_data(self, datamodule) -> None:
        """Take the graph of ``datamodule`` (a graph data module such as ``kd_lab.data.graph.CSBMDataModule``)."""
        datamodule.setup()
        graph = getattr(datamodule, "graph", None)
        if graph is None:
            raise KDLabError(
                f"the GCN teacher needs graph data, but data {type(datamodule).__name__} has no graph: pick a "
                "graph data set (data=csbm or data=csbm_inductive), or a teacher made for this data "
                "(teacher=cnn1d_large)."
            )
        if graph.features.shape[1] != self.layers[0].in_features:
            raise KDLabError(
                f"the GCN reads {self.layers[0].in_features} features per node but the graph has "
                f"{graph.features.shape[1]}: set teacher.model.input_shape=${{data.input_shape}}."
            )
        n = graph.num_nodes
        self.register_buffer("features", graph.features.float(), persistent=False)
        self.register_buffer("adjacency_observed", normalized_adjacency(graph.edges, n, ~graph.held_out), False)
        self.register_buffer("adjacency_full", normalized_adjacency(graph.edges, n), persistent=False)
        self.bound = True

    def propagate(self, adjacency: Tensor, features: Tensor) -> Tensor:
        """Logits of every node, (n, K)."""
        h = features
        for i, layer in enumerate(self.layers):
            h = F.dropout(h, self.dropout, self.training)
            h = torch.sparse.mm(adjacency, layer(h))
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h

    def forward(self, nodes: Tensor) -> Tensor:
        if not self.bound:
            raise KDLabError(
                "the GCN has no graph yet: it takes it from a graph data module (data=csbm) when the run is "
                "built; in Python call gcn.bind_data(datamodule) first."
            )
        if nodes.is_floating_point() or nodes.dim() != 2 or nodes.shape[1] != 2:
            raise KDLabError(
                f"the GCN reads [node, view] rows of node ids (the data's teacher_input), but got a {nodes.dtype} "
                f"tensor of shape {tuple(nodes.shape)}. A GNN teaches on graph data (teacher=gcn); the student of "
                "graph data reads node features only: pick an MLP student (student=mlp_graph)."
            )
        views = nodes[:, 1]
        if not ((views == 0) | (views == 1)).all():
            raise KDLabError(
                f"the GCN input views must be 0 (training graph) or 1 (whole graph), got {views.unique().tolist()}: "
                "feed it the teacher_input of a graph data module (kd_lab.data.graph)."
            )
        out = nodes.new_zeros(len(nodes), self.num_classes, dtype=self.features.dtype)
        for view, adjacency in enumerate((self.adjacency_observed, self.adjacency_full)):
            rows = views == view
            if not rows.any():
                continue
            logits = self.propagate(adjacency, self.features)[nodes[:, 0]]
            out = torch.where(rows[:, None], logits, out)
        return out
