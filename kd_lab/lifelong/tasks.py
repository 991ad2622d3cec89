"""The task sequence: the data's classes split into disjoint tasks, each with its own local labels.

Task k owns the classes ``split[k]`` (e.g. ``[2, 3]``); its samples get the local labels 0..len-1 in that
order, so each task has a head of its own size. The split must use every class of the data exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kd_lab.errors import KDLabError

if TYPE_CHECKING:
    from torch import Tensor


def check_split(split: object, num_classes: int) -> list[list[int]]:
    """``split`` as a list of lists of ints, or a KDLabError that names what is wrong and how to fix it."""
    example = "tasks=[[0,1],[2,3],[4,5],[6,7],[8,9]]"
    if not isinstance(split, Sequence) or isinstance(split, str) or not split:
        raise KDLabError(f"tasks={split!r} is not a list of tasks; give a list of class lists, e.g. {example}.")
    tasks = []
    for k, task in enumerate(split):
        if isinstance(task, str) or not isinstance(task, Sequence) or not all(isinstance(c, int) for c in task):
            raise KDLabError(f"tasks[{k}]={task!r} is not a list of class ids (ints); e.g. {example}.")
        if len(task) < 2:
            # one class is one logit: softmax makes it 1 whatever the input, so the head learns nothing
            raise KDLabError(
                f"tasks[{k}]={list(task)} has {len(task)} class(es), but a task needs at least 2 (a head over "
                f"one class always predicts it); merge it into another task, e.g. {example}."
            )
        tasks.append(list(task))
    used = [c for task in tasks for c in task]
    outside = sorted({c for c in used if not 0 <= c < num_classes})
    repeated = sorted({c for c in used if used.count(c) > 1})
    missing = sorted(set(range(num_classes)) - set(used))
    problems = []
    if outside:
        problems.append(f"classes {outside} are not classes of the data (0..{num_classes - 1})")
    if repeated:
        problems.append(f"classes {repeated} are in more than one task")
    if missing:
        problems.append(f"classes {missing} are in no task")
    if problems:
        raise KDLabError(
            f"tasks={tasks} does not split the data's {num_classes} classes into disjoint tasks: "
            f"{'; '.join(problems)}. Give every class 0..{num_classes - 1} to exactly one task, e.g. {example}."
        )
    return tasks


def task_subsets(x: Tensor, y: Tensor, tasks: list[list[int]], split_name: str) -> list[tuple[Tensor, Tensor]]:
    """For each task: its inputs and their local labels (the class's position in the task)."""
    import torch  # here, not at the top: the config checks import this module before torch is needed

    local = torch.full((max(c for task in tasks for c in task) + 1,), -1, dtype=torch.int64)
    subsets = []
    for k, classes in enumerate(tasks):
        keep = torch.isin(y, torch.tensor(classes))
        if not keep.any():
            raise KDLabError(
                f"task {k} (classes {classes}) has no samples in the {split_name} split, so it cannot be "
                "learned or measured; use more data (e.g. data=mnist1d) or another split (tasks=...)."
            )
        local[torch.tensor(classes)] = torch.arange(len(classes))
        subsets.append((x[keep], local[y[keep]]))
    return subsets
