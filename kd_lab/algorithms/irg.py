"""Instance relationship graph (Liu, Cao, Li, Yuan, Hu, Li, Duan, CVPR 2019, "Knowledge Distillation via Instance
Relationship Graph"). Reference: yufanLIU/IRG; the PyTorch port is AberHu/Knowledge-Distillation-Zoo kd_losses/irg.py.

A batch is a graph. Its vertices are the instances, its edges their pairwise distances in a layer, and its
transformation how far each instance moves between two layers. The student matches all three:

    vertex:          MSE(z_s, z_t) on the logits
    edges, layer l:  E_l[i, j] = ||f_l(x_i) - f_l(x_j)||^2 / max_ij(...)       MSE(E_l^s, E_l^t)
    transformation:  T[i] = ||f_a(x_i) - f_b(x_i)||^2 / max_i(...)              MSE(T^s, T^t)
    loss = ce_weight * CE + vertex_weight * vertex + edge_weight * mean_l(edge_l) + transformation_weight * tran

Edges are taken on the embedding (the classifier's input) and on each of the ``layers`` (default the last two
stages). The transformation runs from the first of the ``layers`` to the last, inside one network, so the two
need comparable shapes: the earlier map is average-pooled to the later map's length, and the wider one's
channels are averaged in adjacent groups down to the narrower width (KD-Zoo halves them). Widths that do not
divide are refused at build time. Edges compare batch x batch matrices, so the two networks' widths may differ.

Defaults: vertex 0.1, edge 5, transformation 5, with CE 1 (KD-Zoo's w_irg_vert, w_irg_edge, w_irg_tran, on
rb2, rb3, the embedding and the logits of CIFAR ResNets: our last two stages and the embedding).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lab.algorithms.base import Algorithm, BuildContext, StepOutputs
from kd_lab.core.bounds import NonNegative
from kd_lab.core.recorder import TapSpec, resolve_tap, stage_taps
from kd_lab.errors import KDLabError

EPS = 1e-12  # the largest distance is clamped here before dividing: a batch of identical rows gives zeros


def _max_normalized(d: Tensor) -> Tensor:
    return d / d.max().clamp(min=EPS)


def edge_matrix(feature: Tensor) -> Tensor:
    """(B, ...) -> (B, B) squared Euclidean distances, 0 on the diagonal, divided by their largest value.

    From the Gram matrix of the centered rows: no (B, B, D) tensor. Squared, so no square root has an
    infinite gradient at a zero distance."""
    x = feature.flatten(1)
    x = x - x.mean(0)
    g = x @ x.t()
    n = g.diagonal()
    sq = (n[:, None] + n[None, :] - 2 * g).clamp(min=0)
    sq = sq * (1 - torch.eye(len(x), dtype=sq.dtype, device=sq.device))
    return _max_normalized(sq)


def match_layers(early: Tensor, late: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two layers of one network to one shape: pool the earlier map to the later's spatial size, then
    average the wider one's channels in adjacent groups. Shapes that cannot meet raise ``KDLabError``."""
    if early.dim() > 2 and early.dim() == late.dim() and early.shape[2:] != late.shape[2:]:
        pool = F.adaptive_avg_pool1d if early.dim() == 3 else F.adaptive_avg_pool2d
        early = pool(early, late.shape[2:])
    if early.dim() != late.dim() or early.shape[2:] != late.shape[2:]:
        raise KDLabError(
            f"algorithm=irg's transformation compares two layers of one network, but their shapes "
            f"{tuple(early.shape)} and {tuple(late.shape)} do not meet (a map and a vector, or maps of different "
            "dimensionality). Pick algorithm.layers of one kind, or set algorithm.transformation_weight=0."
        )
    c_e, c_l = early.shape[1], late.shape[1]
    wide, narrow = max(c_e, c_l), min(c_e, c_l)
    if wide % narrow:
        raise KDLabError(
            f"algorithm=irg's transformation compares two layers of {c_e} and {c_l} channels; {wide} is not a "
            f"multiple of {narrow}, so adjacent channels cannot be averaged to one width. Pick algorithm.layers "
            "whose widths divide, or set algorithm.transformation_weight=0."
        )

    def squeeze(x: Tensor) -> Tensor:
        if x.shape[1] == narrow:
            return x
        return x.unflatten(1, (narrow, x.shape[1] // narrow)).mean(2)

    return squeeze(early), squeeze(late)


def transformation_vector(early: Tensor, late: Tensor) -> Tensor:
    """(B,) squared distance of each instance between two layers, divided by the largest."""
    a, b = match_layers(early, late)
    return _max_normalized((a - b).flatten(1).pow(2).sum(1))


def irg_losses(
    s_logits: Tensor, t_logits: Tensor, s_edges: list[Tensor], t_edges: list[Tensor], s_tran, t_tran
) -> dict[str, Tensor]:
    """The three unweighted terms. ``*_edges``: the features whose edges are matched, pair by pair;
    ``*_tran``: (earlier, later) features of each network, or None to skip the transformation."""
    edge = torch.stack([F.mse_loss(edge_matrix(s), edge_matrix(t)) for s, t in zip(s_edges, t_edges, strict=True)])
    terms = {"vertex": F.mse_loss(s_logits, t_logits), "edge": edge.mean()}
    if s_tran is not None:
        terms["transformation"] = F.mse_loss(transformation_vector(*s_tran), transformation_vector(*t_tran))
    return terms


class IRG(Algorithm):
    name = "irg"
    schemes = frozenset({"offline", "online"})

    def __init__(
        self,
        ce_weight: NonNegative = 1.0,
        vertex_weight: NonNegative = 0.1,
        edge_weight: NonNegative = 5.0,
        transformation_weight: NonNegative = 5.0,
        layers: list[TapSpec] = (-2, -1),  # a tuple: never mutated
        teacher_layers: list[TapSpec] | None = None,
    ):
        super().__init__(ce_weight)
        self.vertex_weight, self.edge_weight = vertex_weight, edge_weight
        self.transformation_weight = transformation_weight
        self.layer_specs = (list(layers), list(teacher_layers) if teacher_layers is not None else list(layers))
        self.paths: tuple[list[str], list[str]] = ([], [])
        self.embeddings = ("", "")

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        sides = ((student, self.layer_specs[0], "student"), (teacher, self.layer_specs[1], "teacher"))
        for model, specs, role in sides:
            stages = stage_taps(model)
            if self.transformation_weight and any(isinstance(x, int) for x in specs) and 0 < len(stages) < 2:
                raise KDLabError(
                    f"algorithm=irg's transformation needs two layers of each network, but the {role} "
                    f"({type(model).__name__}) has one stage {stages}. Give a deeper {role}, or set "
                    "algorithm.transformation_weight=0 algorithm.layers=[-1]."
                )
        s = [resolve_tap(student, spec, "student") for spec in self.layer_specs[0]]
        t = [resolve_tap(teacher, spec, "teacher") for spec in self.layer_specs[1]]
        if len(s) != len(t):
            raise KDLabError(
                f"algorithm=irg matches student and teacher layers pair by pair, but got {len(s)} student layers "
                f"{s} and {len(t)} teacher layers {t}; give algorithm.teacher_layers of the same length."
            )
        if self.transformation_weight and (len(s) < 2 or len(set(s)) < 2 or len(set(t)) < 2):
            raise KDLabError(
                f"algorithm=irg's transformation needs two distinct layers in each network, but algorithm.layers "
                f"gives student {s} and teacher {t} (a student with {len(set(s))} distinct stage). Give two "
                "layers, e.g. algorithm.layers=[0,-1], or set algorithm.transformation_weight=0."
            )
        self.paths = (s, t)
        # edge pairs: each layer pair, then the embeddings; an MLP's embedding is its last layer, counted once
        self.edge_pairs = list(
            dict.fromkeys(
                zip(
                    [*s, resolve_tap(student, "embedding", "student")],
                    [*t, resolve_tap(teacher, "embedding", "teacher")],
                    strict=True,
                )
            )
        )
        self.embeddings = (resolve_tap(student, "embedding", "student"), resolve_tap(teacher, "embedding", "teacher"))

    @property
    def student_taps(self) -> list[str]:
        return [*self.paths[0], self.embeddings[0]]

    @property
    def teacher_taps(self) -> list[str]:
        return [*self.paths[1], self.embeddings[1]]

    def build(self, student_shapes, teacher_shapes, context: BuildContext) -> None:
        if not self.transformation_weight:
            return
        sides = ((student_shapes, self.paths[0], "student"), (teacher_shapes, self.paths[1], "teacher"))
        for shapes, paths, role in sides:
            early, late = torch.zeros(shapes[paths[0]]), torch.zeros(shapes[paths[-1]])
            try:
                match_layers(early, late)
            except KDLabError as e:
                raise KDLabError(f"{role} layers '{paths[0]}' and '{paths[-1]}': {e}") from None

    def forward(self, out: StepOutputs) -> dict[str, Tensor]:
        fs, ft = out.features, out.teacher_features
        s_edges = [fs[p] for p, _ in self.edge_pairs]
        t_edges = [ft[p].detach() for _, p in self.edge_pairs]
        tran = bool(self.transformation_weight)
        s_tran = (fs[self.paths[0][0]], fs[self.paths[0][-1]]) if tran else None
        t_tran = (ft[self.paths[1][0]].detach(), ft[self.paths[1][-1]].detach()) if tran else None
        raw = irg_losses(out.logits, out.teacher_logits.detach(), s_edges, t_edges, s_tran, t_tran)
        terms = self.ce_term(out)
        weights = {"vertex": self.vertex_weight, "edge": self.edge_weight, "transformation": self.transformation_weight}
        terms.update({f"irg_{k}": weights[k] * v for k, v in raw.items() if weights[k]})
        return terms
