"""Value ranges of config keys, in one table. A key is matched by ``fnmatch`` on its dotted path (``*``
spans dots), so ``*optimizer.lr`` covers the student's ``optim`` and the teacher's ``teacher.optim``. A
list value is checked element by element; the first matching row decides. inf and nan break every row."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any


@dataclass(frozen=True)
class Rule:
    text: str  # what is allowed, as the message says it
    ok: Callable[[float], bool]


POSITIVE = Rule("> 0", lambda v: v > 0)
NON_NEGATIVE = Rule(">= 0", lambda v: v >= 0)
AT_LEAST_ONE = Rule(">= 1", lambda v: v >= 1)
AT_LEAST_TWO = Rule(">= 2", lambda v: v >= 2)
UNIT_INTERVAL = Rule("in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_ONE = Rule("in [0, 1)", lambda v: 0 <= v < 1)
SEED = Rule("in [0, 2**32 - 1]", lambda v: 0 <= v <= 2**32 - 1)  # Lightning replaces others with a random seed
SPLIT = Rule(
    "a fraction in (0, 1) or a count >= 1",
    lambda v: 0 < v < 1 if isinstance(v, float) else v >= 1,
)


@dataclass(frozen=True)
class Bound:
    pattern: str
    rule: Rule
    why: str  # what the key is, so that the message says why the range
    example: str  # a sensible value, for the fix


RANGES: tuple[Bound, ...] = (
    # algorithms declare their bounds in their signatures (kd_lab.core.bounds)
    # optimizers and schedules, the student's and the teacher's
    Bound("*optimizer.lr", POSITIVE, "the learning rate", "1e-3"),
    Bound("*optimizer.weight_decay", NON_NEGATIVE, "the weight decay", "1e-4"),
    Bound("*optimizer.momentum", UNIT_INTERVAL, "the momentum", "0.9"),
    Bound("*scheduler.warmup_epochs", NON_NEGATIVE, "the warm-up length in epochs", "0"),
    Bound("*scheduler.gamma", POSITIVE, "the decay factor", "0.1"),
    Bound("*scheduler.milestones", NON_NEGATIVE, "epochs at which the rate decays", "[150, 180, 210]"),
    # data
    Bound("data.num_classes", AT_LEAST_TWO, "the class count", "10"),
    Bound("data.batch_size", AT_LEAST_ONE, "the training batch size", "128"),
    Bound("data.eval_batch_size", AT_LEAST_ONE, "the evaluation batch size", "1000"),
    Bound("data.val_size", SPLIT, "the validation split carved from train", "0.1"),
    Bound("data.num_train", AT_LEAST_ONE, "the number of training samples", "256"),
    Bound("data.num_test", AT_LEAST_ONE, "the number of test samples", "128"),
    Bound("data.num_samples", AT_LEAST_ONE, "the number of generated samples", "5000"),
    Bound("data.test_fraction", Rule("in (0, 1)", lambda v: 0 < v < 1), "the test split", "0.2"),
    Bound("data.augment.*", NON_NEGATIVE, "an augmentation strength; 0 switches it off", "0.1"),
    Bound("data.student_view.downsample", AT_LEAST_ONE, "the student view's pooling factor", "4"),
    Bound("data.student_view.noise_std", NON_NEGATIVE, "the student view's noise", "0.3"),
    Bound("data.input_shape", AT_LEAST_ONE, "the input shape without the batch axis", "[1, 40]"),
    # training length and seeds
    Bound("trainer.max_epochs", AT_LEAST_ONE, "the student's epochs", "300"),
    Bound("teacher.max_epochs", AT_LEAST_ONE, "the teacher's epochs", "30"),
    Bound("seed", SEED, "the run's seed", "0"),
    Bound("threads", AT_LEAST_ONE, "CPU threads per process (null keeps torch's default)", "1"),
    Bound("teacher.seed", SEED, "the teacher's seed", "0"),
    Bound("data.split_seed", SEED, "the validation split's seed", "0"),
    Bound("callbacks.*.every", AT_LEAST_ONE, "a period in epochs", "5"),
)


def _numbers(value: Any) -> list[float] | None:
    items = value if isinstance(value, list | tuple) else [value]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
        return list(items)
    return None  # not numeric (a type error is reported elsewhere), or null: nothing to bound


def out_of_range(path: str, value: Any) -> Bound | None:
    """The row that ``path=value`` breaks, or None."""
    for bound in RANGES:
        if fnmatchcase(path, bound.pattern):
            numbers = _numbers(value)
            if numbers is not None and not all(math.isfinite(v) and bound.rule.ok(v) for v in numbers):
                return bound
            return None
    return None
