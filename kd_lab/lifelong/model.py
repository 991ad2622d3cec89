"""A multi-head network: one shared trunk, one linear head per task (the task-incremental setting).

The trunk is a kd-lab model (conf/student) without its classifier: its ``head`` is replaced by an identity,
so the trunk outputs the classifier's input. The task id picks the head at training and test time.
"""

from collections.abc import Sequence

from torch import Tensor, nn

from kd_lab.errors import KDLabError


class MultiHeadNet(nn.Module):
    def __init__(self, trunk: nn.Module, feature_dim: int, head_sizes: Sequence[int]):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(feature_dim, n) for n in head_sizes)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def forward(self, x: Tensor, task: int) -> Tensor:
        """The logits of ``task``'s head."""
        return self.heads[task](self.trunk(x))


def multihead_from(model: nn.Module, head_sizes: Sequence[int], name: str = "trunk.model") -> MultiHeadNet:
    """``model``'s body as the shared trunk, with one new head per task. ``model`` must end in a Linear
    ``head`` (kd-lab's MLP and CNN1d do): its input size is the trunk's feature size."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise KDLabError(
            f"{name} ({type(model).__name__}) has no Linear `head`, so its trunk cannot be split from its "
            "classifier; pick a kd-lab model that ends in one, e.g. student@trunk=mlp_medium or "
            "student@trunk=cnn1d_tiny."
        )
    model.head = nn.Identity()
    return MultiHeadNet(model, head.in_features, head_sizes)
