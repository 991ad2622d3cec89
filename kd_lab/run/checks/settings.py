"""Settings that are valid one by one but cannot do what they say together, found before compute.

A warning is logged where the run still means something: a warm-up longer than the run, a learning-rate
decay scheduled after the last epoch, an assistant that is no assistant. Each names the setting and the fix.
A ``KDLabError`` is raised only where the run would be meaningless: a loss whose every weight is 0 (the
student steps on a zero loss and learns nothing), or a chain under an algorithm that ignores its teacher
(every stage, the run too, is the same vanilla student).

Epochs count from 0, as Lightning's ``current_epoch`` does: a run of E epochs ends with epoch E - 1.
"""

import logging
from collections import Counter
from typing import Any

from hydra._internal.utils import _locate

from kd_lab.errors import KDLabError

log = logging.getLogger(__name__)

# DKD's loss weights are alpha and beta (its TCKD and NCKD terms), besides its ce_weight
EXTRA_WEIGHT_KEYS = ("alpha", "beta")


def check_settings(tree: dict[str, Any]) -> list[str]:
    """Log a warning for every setting of the resolved config ``tree`` that cannot do what it says, and
    return them; raise for a run that would be meaningless. A debug run (``trainer.fast_dev_run``) is only
    checked for the refusals: it is not meant to finish its schedules."""
    _refuse_zero_loss(tree)
    _refuse_chain_without_teacher(tree)
    _refuse_quantized_chain(tree)
    if (tree.get("trainer") or {}).get("fast_dev_run"):
        return []
    found = [*_warmup(tree), *_initialization(tree), *_schedules(tree), *_assistants(tree)]
    for message in found:
        log.warning(message)
    return found


def _epochs(node: dict[str, Any] | None) -> int | None:
    """``max_epochs`` of a trainer or teacher node, when it bounds the run (not null, not -1)."""
    value = (node or {}).get("max_epochs")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _class(node: dict[str, Any] | None) -> type | None:
    target = (node or {}).get("_target_")
    try:
        return _locate(target) if target else None
    except Exception:  # the schema check names a target that cannot be imported
        return None


# -- refusals ------------------------------------------------------------------------------------------
def _weight_keys(algorithm: dict[str, Any]) -> list[str]:
    keys = [k for k in algorithm if k.endswith("_weight")]
    if getattr(_class(algorithm), "name", None) == "dkd":
        keys += [k for k in EXTRA_WEIGHT_KEYS if k in algorithm]
    return keys


def _refuse_zero_loss(tree: dict[str, Any]) -> None:
    algorithm = tree.get("algorithm") or {}
    keys = _weight_keys(algorithm)
    numbers = [algorithm[k] for k in keys if isinstance(algorithm[k], int | float)]
    if not keys or len(numbers) != len(keys) or any(v != 0 for v in numbers):
        return
    zeros = " and ".join(f"algorithm.{k}=0" for k in keys)
    raise KDLabError(
        f"{zeros}: every term of the {algorithm.get('name')} loss is weighted 0, so the student takes its steps "
        f"on a zero loss and learns nothing; set at least one weight above 0, e.g. algorithm.{keys[0]}=1."
    )


def _refuse_chain_without_teacher(tree: dict[str, Any]) -> None:
    chain, algorithm = tree.get("chain") or {}, tree.get("algorithm") or {}
    if not chain or (tree.get("scheme") or {}).get("name") != "offline":
        return  # another scheme: the chain refuses it itself, with its own message (kd_lab/run/chain.py)
    cls = _class(algorithm)
    if cls is None or getattr(cls, "needs_teacher", True):
        return
    raise KDLabError(
        f"chain={chain.get('name')} with algorithm={algorithm.get('name')}: that algorithm ignores its teacher, "
        "so every stage of the chain, and the run, trains on the labels alone and the chain teaches nothing; "
        "pick a distillation algorithm (e.g. algorithm=kd), or drop the chain (chain=null)."
    )


def _refuse_quantized_chain(tree: dict[str, Any]) -> None:
    """A chain's earlier stages become plain teachers; a quantized stage's state dict does not load into one."""
    quantize = (tree.get("quantize") or {}).get("name")
    if tree.get("chain") and quantize not in (None, "none"):
        raise KDLabError(
            f"quantize={quantize} with chain={tree['chain'].get('name')}: every stage would train a quantized "
            "student, and an earlier stage's weights then teach as a plain fp32 model, which is not what was "
            "trained; drop the chain (chain=null) or set quantize=none."
        )


# -- warnings ------------------------------------------------------------------------------------------
def _warmup(tree: dict[str, Any]) -> list[str]:
    """A loss-weight warm-up (DKD's ``warmup_epochs``) as long as the run: w = min(1, (epoch + 1) / W)."""
    algorithm = tree.get("algorithm") or {}
    warmup, epochs = algorithm.get("warmup_epochs"), _epochs(tree.get("trainer"))
    if not isinstance(warmup, int | float) or not epochs or warmup < epochs:
        return []
    name = algorithm.get("name")
    if warmup > epochs:
        reach = f"never reach full weight (at most {epochs / warmup:.2f} of it, in the last epoch)"
    else:
        reach = "reach full weight only in the last epoch"
    return [
        f"algorithm.warmup_epochs={warmup} with trainer.max_epochs={epochs}: the warm-up of {name}'s distillation "
        f"terms is as long as the run, so they {reach}. Set algorithm.warmup_epochs below {epochs} "
        f"(about max_epochs / 12: algorithm.warmup_epochs={epochs // 12}; 0 disables the warm-up), "
        f"or train longer."
    ]


def _initialization(tree: dict[str, Any]) -> list[str]:
    """An initialization stage (AB's ``init_epochs``) as long as the run: the task loss never trains."""
    algorithm = tree.get("algorithm") or {}
    init, epochs = algorithm.get("init_epochs"), _epochs(tree.get("trainer"))
    if not isinstance(init, int) or not epochs or init < epochs or algorithm.get("joint"):
        return []
    return [
        f"algorithm.init_epochs={init} with trainer.max_epochs={epochs}: {algorithm.get('name')}'s initialization "
        "stage (its transfer term alone) lasts the whole run, so the student never trains on the task's loss. "
        f"Set algorithm.init_epochs below {epochs} (e.g. {max(1, epochs // 8)}), or algorithm.joint=true."
    ]


def _schedules(tree: dict[str, Any]) -> list[str]:
    """The run's schedule over trainer.max_epochs; a store-trained teacher's over teacher.max_epochs."""
    found = _schedule("optim", tree.get("optim"), "trainer.max_epochs", _epochs(tree.get("trainer")))
    teacher = tree.get("teacher") or {}
    trained_by_store = (
        teacher
        and not teacher.get("ckpt_path")
        and getattr(_class(tree.get("scheme")), "teacher_source", None) == "store"
        and (tree.get("chain") or {}).get("generations") is None  # born-again: no teacher config is used
    )
    if trained_by_store:
        found += _schedule("teacher.optim", teacher.get("optim"), "teacher.max_epochs", _epochs(teacher))
    return found


def _schedule(path: str, optim: dict[str, Any] | None, epochs_key: str, epochs: int | None) -> list[str]:
    scheduler = (optim or {}).get("scheduler") or {}
    if not epochs or not scheduler:
        return []
    key = f"{path}.scheduler"
    found = []
    warmup = scheduler.get("warmup_epochs")
    if isinstance(warmup, int | float) and warmup > 0 and warmup >= epochs:
        found.append(
            f"{key}.warmup_epochs={warmup} with {epochs_key}={epochs}: the learning rate warms up for the whole "
            f"run, so it reaches {path}.optimizer.lr only at the last step, if at all, and never decays. Set "
            f"{key}.warmup_epochs well below {epochs} (e.g. {key}.warmup_epochs={max(1, epochs // 20)}), or 0."
        )
    milestones = scheduler.get("milestones")
    if isinstance(milestones, list) and milestones:
        late = [m for m in milestones if isinstance(m, int | float) and m >= epochs]
        if late:
            scaled = [max(1, int(epochs * f)) for f in (0.625, 0.75, 0.875)]  # 150, 180, 210 of 240
            found.append(
                f"{key}.milestones={milestones} with {epochs_key}={epochs}: the decays at {late} never happen "
                f"(the last epoch is {epochs - 1}), so the rate decays {len(milestones) - len(late)} of "
                f"{len(milestones)} times. Scale the milestones to the run (the CIFAR recipe decays at 62.5%, "
                f"75% and 87.5% of it: {key}.milestones=[{','.join(map(str, scaled))}]), "
                f"or set {epochs_key}={int(max(late)) + 1} or more."
            )
        if scheduler.get("gamma") == 1:
            found.append(
                f"{key}.gamma=1 with {key}.milestones={milestones}: each decay multiplies the rate by 1, so the "
                f"milestones change nothing; set {key}.gamma below 1 (the CIFAR recipe: {key}.gamma=0.1)."
            )
    return found


def _assistants(tree: dict[str, Any]) -> list[str]:
    """A teacher-assistant chain's assistants should sit between the teacher and the student, largest first."""
    assistants = (tree.get("chain") or {}).get("assistants")
    if not isinstance(assistants, list):
        return []
    found = []
    student = (tree.get("student") or {}).get("name")
    if student in assistants:
        found.append(
            f"chain.assistants={assistants} names the run's student {student}: that stage is the student's own "
            f"architecture, not an assistant of intermediate size, so the run distills {student} from itself "
            f"(a born-again step; chain=born_again does that on purpose). Name student configs between the "
            f"teacher and {student} in size, largest first."
        )
    twice = sorted(name for name, count in Counter(assistants).items() if count > 1)
    if twice:
        found.append(
            f"chain.assistants={assistants} names {twice} more than once: the later stage distills the same "
            f"architecture from itself, not a smaller assistant. Name each assistant once, largest first."
        )
    return found
