"""``validate_config(cfg)``: every mistake in a composed config becomes one ``KDLabError`` sentence that names
the key, the bad value, what is allowed and the fix, before anything is trained or written.

Checked, in this order: keys that no schema knows (``+algorithm.temprature=4``; the closest valid key is
suggested), values of the wrong type (``algorithm.temperature=hot``), values out of range (the table in
``kd_lab.run.checks.ranges``, and the bounds in signatures, ``kd_lab.core.bounds``), files named by the
config, the GPUs the trainer asks for (``kd_lab.run.checks.devices``), the algorithm x scheme x task pairing,
settings that cannot do what they say together (``kd_lab.run.checks.settings``: a warning, or a refusal
where the run would be meaningless), and what ``ckpt_path`` holds (``kd_lab.run.checks.checkpoint``).
Nothing is built: tap paths, connectors, output shapes and the data are checked by the data module's setup
and the run's one build, with untrained teachers (``kd_lab.run.assemble.build_run``). Unknown options of a
group (``algorithm=kdd``) never reach this: Hydra rejects them while composing and lists the valid options.
"""

import difflib
from pathlib import Path
from typing import Any

from hydra._internal.utils import _locate  # what instantiate() uses; get_object() also logs
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError

from kd_lab.core.bounds import bounds_of, check_value
from kd_lab.errors import KDLabError
from kd_lab.run.builders import CONFIG_DIR, META_KEYS, group_options, to_dict
from kd_lab.run.checks.checkpoint import CKPT_KEYWORDS, check_resume_checkpoint
from kd_lab.run.checks.compatibility import check_compatible
from kd_lab.run.checks.devices import check_devices
from kd_lab.run.checks.groups import GROUP_SCHEMAS, RunScalars
from kd_lab.run.checks.ranges import out_of_range
from kd_lab.run.checks.settings import check_settings
from kd_lab.run.checks.signatures import EMPTY, Signature, fits, signature_of, type_name

# nodes that kd_lab.run.builders.build() instantiates: it drops META_KEYS (name, extra_teachers, ...) first
BUILT_WITHOUT_META = {"data", "task", "algorithm", "scheme", "perf", "quantize", "student.model", "teacher.model"}
BUILT_WITHOUT_META |= {f"{o}.{part}" for o in ("optim", "teacher.optim") for part in ("optimizer", "scheduler")}
MAX_LISTED = 12


def validate_config(cfg: DictConfig) -> None:
    """Raise for the first mistake in ``cfg``; nothing is built."""
    check_schema(cfg)
    check_devices(to_dict(cfg.get("trainer")))  # before the data is generated or a teacher lock taken
    check_pairing(cfg)  # the pairing rules before the build: they explain a build error
    check_settings(to_dict(cfg))  # settings that cannot do what they say: warnings, or a refusal
    check_resume_checkpoint(to_dict(cfg))  # reads the file: last


def check_pairing(cfg: DictConfig) -> None:
    """Refuse an algorithm under a scheme or on a task it does not fit (kd_lab.run.checks.compatibility)."""
    task = cfg.get("task") or {}
    kind = getattr(_locate(task["_target_"]), "kind", None) if "_target_" in task else None
    check_compatible(cfg.algorithm.name, cfg.algorithm.get("_target_"), cfg.scheme.name, kind)


def check_schema(cfg: DictConfig) -> None:
    """Keys, types, ranges and named files; no object is built."""
    try:
        tree = to_dict(cfg)
    except InterpolationKeyError as e:  # an option that expects a key this config does not have
        check_pairing(cfg)  # an algorithm made for another task is the likely cause: say that first
        raise KDLabError(
            f"{e.full_key} cannot be resolved ({e.msg}): the option that sets it expects a key the other options "
            f"do not have (a classifier's data.input_shape on text data, say); pick options made for each other, "
            f"or set {e.full_key}=<value> yourself."
        ) from None
    _check_root_keys(tree)
    for key, value in tree.items():
        if key != "hydra":
            _check_node(key, value)
    _check_files(tree)
    _check_extra_teachers(tree)


def root_keys() -> set[str]:
    """The keys ``conf/train.yaml`` declares, and its groups (``optim@teacher.optim`` lives in ``teacher``)."""
    train = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "train.yaml"))
    keys = {k for k in train if k != "defaults"} | {"hydra"}
    for entry in train.get("defaults", []):
        for group in entry if isinstance(entry, dict) else []:
            package = group.split("@")[-1]
            keys.add(package.split(".")[0].removeprefix("override "))
    return keys


def _check_root_keys(tree: dict[str, Any]) -> None:
    valid = root_keys()
    owner = "the run config (conf/train.yaml)"
    for key, value in tree.items():
        if key not in valid:
            raise KDLabError(_unknown_key_message(key, "", value, owner, valid, tree))
    scalars = signature_of(RunScalars)
    for key, value in tree.items():  # before the nodes that interpolate them (data.seed is ${seed})
        if key in scalars.params:
            _check_type(key, value, scalars, owner, key)


def _node_signature(path: str, node: dict[str, Any]) -> tuple[Signature, str] | None:
    """The node's schema and how messages name it (its ``_target_`` as written, or its group)."""
    if "_target_" in node:
        try:
            target = _locate(node["_target_"])
        except Exception:
            raise KDLabError(
                f"{path}._target_={node['_target_']} cannot be imported (no such module, class or function); "
                "fix the dotted path, or pick a shipped option of the group (kd-lab --help lists them)."
            ) from None
        return signature_of(target), node["_target_"]
    if path in GROUP_SCHEMAS:
        return signature_of(GROUP_SCHEMAS[path]), f"the {path} group"
    return None


def _check_node(path: str, value: Any) -> None:
    if not isinstance(value, dict):
        _check_range(path, value)
        return
    found = _node_signature(path, value)
    if found is not None:
        signature, owner = found
        meta = set(META_KEYS) if path in BUILT_WITHOUT_META else set()
        bounds = _bounds(value)
        for key, item in value.items():
            if key.startswith("_"):  # _target_, _partial_, _recursive_: Hydra's own
                continue
            if key in signature.params:
                _check_type(f"{path}.{key}", item, signature, owner, key)
                if key in bounds:
                    check_value(path, key, item, bounds[key])
            elif key not in meta and not signature.open:
                listed = set(signature.params) | (meta & set(value))
                raise KDLabError(_unknown_key_message(key, path, item, owner, listed, value))
    for key, item in value.items():
        if not key.startswith("_"):
            _check_node(f"{path}.{key}", item)


def _bounds(node: dict[str, Any]) -> dict:
    """The bounds that the node's target declares in its signature, along its MRO (``kd_lab.core.bounds``)."""
    if "_target_" not in node:
        return {}
    target = _locate(node["_target_"])
    inits = [k.__dict__["__init__"] for k in getattr(target, "__mro__", ()) if "__init__" in k.__dict__]
    found: dict = {}
    for init in reversed(inits or [target]):
        found.update(bounds_of(getattr(init, "__wrapped__", init)))
    return found


def _unknown_key_message(key: str, path: str, value: Any, owner: str, valid: set[str], node: dict) -> str:
    full = f"{path}.{key}" if path else key
    near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    keys = sorted(k for k in valid if not k.startswith("_"))
    if len(keys) > MAX_LISTED:  # a Trainer has ~40: the closest ones say more than all of them
        keys = [*sorted(difflib.get_close_matches(key, keys, n=MAX_LISTED, cutoff=0)), f"... ({len(keys)} in all)"]
    listed = ", ".join(keys)
    head = f"unknown key {full}={_show(value)}: {owner} takes {listed}"
    if not near:
        return f"{head}; remove the key or use one of those."
    fixed = f"{path}.{near[0]}" if path else near[0]
    plus = "" if near[0] in node else "+"  # an existing key is set without '+'; a new one needs it
    return f"{head}; did you mean {fixed}? Write {plus}{fixed}={_show(value)} instead."


def _check_type(full: str, value: Any, signature: Signature, owner: str, key: str) -> None:
    if value == "???" or (value is None and signature.params[key].default is None):
        return
    tp = signature.hints.get(key, signature.params[key].annotation)
    if fits(value, tp):
        return
    default = signature.params[key].default
    usable = default not in (EMPTY, None) and fits(default, tp)
    example = f"; e.g. {full}={_show(default)} (the default)" if usable else ""
    raise KDLabError(
        f"{full}={_show(value)} has the wrong type: {owner} takes {type_name(tp)} for {key}, "
        f"not {type(value).__name__}{example}."
    )


def _check_range(full: str, value: Any) -> None:
    bound = out_of_range(full, value)
    if bound is not None:
        raise KDLabError(
            f"{full}={_show(value)} is out of range: it must be {bound.rule.text} ({bound.why}); "
            f"set e.g. {full}={bound.example}."
        )


def _check_files(tree: dict[str, Any]) -> None:
    ckpt = tree.get("ckpt_path")
    if ckpt and ckpt not in CKPT_KEYWORDS and not str(ckpt).startswith("registry") and not Path(ckpt).is_file():
        raise KDLabError(
            f"ckpt_path={ckpt} is not a checkpoint file; point it at a run's checkpoints/last.ckpt, or set "
            "ckpt_path=null to train from scratch."
        )


def _check_extra_teachers(tree: dict[str, Any]) -> None:
    names = (tree.get("algorithm") or {}).get("extra_teachers") or []
    valid = group_options("teacher")
    for name in names:
        if name not in valid:
            near = difflib.get_close_matches(str(name), valid, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise KDLabError(
                f"algorithm.extra_teachers names '{name}', which is no teacher config; {hint}"
                f"pick from {valid}, e.g. 'algorithm.extra_teachers=[{(near or valid)[0]}]'."
            )


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) and value != "" else str(value)
