"""Average accuracy and forgetting from an accuracy matrix (Chaudhry et al., ECCV 2018, arXiv:1801.10112).

``acc[i][j]``: the test accuracy on task j after training on task i (None for a task not seen yet, j > i).

- average accuracy after task i: the mean of ``acc[i][j]`` over the tasks seen so far (j <= i);
- forgetting of old task j: its best accuracy before the last task, ``max_{l < T-1} acc[l][j]``, minus its
  final accuracy ``acc[T-1][j]``; the forgetting of a sequence is its mean over the tasks j < T-1.

A matrix of one row (joint training learns every task at once) has no forgetting: it is None.
"""

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def average_accuracy(acc: Matrix) -> list[float]:
    """The mean accuracy over the tasks seen, after each row's task (None entries are tasks not seen yet)."""
    means = []
    for i, row in enumerate(acc):
        seen = [a for a in row if a is not None]
        if not seen:
            raise ValueError(f"row {i} of the accuracy matrix has no accuracy of a seen task: {list(row)}")
        means.append(sum(seen) / len(seen))
    return means


def forgetting_per_task(acc: Matrix) -> list[float]:
    """For each old task j (every task but the last one learned): best accuracy before the end minus final."""
    last = len(acc) - 1
    return [max(acc[i][j] for i in range(j, last)) - acc[last][j] for j in range(last)]


def forgetting(acc: Matrix) -> float | None:
    """The mean forgetting over the old tasks; None when there is no old task (one row)."""
    per_task = forgetting_per_task(acc)
    return sum(per_task) / len(per_task) if per_task else None
