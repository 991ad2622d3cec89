"""``ckpt_path``: the Lightning checkpoint a run continues from, checked before any compute.

Lightning reads it only in ``Trainer.fit``, after the data was loaded and the teacher trained, and then fails
with its own errors: ``KeyError: 'pytorch-lightning_version'`` for a plain state dict, ``Unexpected key(s) in
state_dict`` for a checkpoint of another algorithm or model. Here the file is opened first (memory-mapped: its
tensors are not read); a Lightning checkpoint written by a kd-lab run is compared with the config of that run,
which lies next to it (``<run dir>/resume.yaml``, else the ``config`` of ``<run dir>/results.json``), on the
keys that decide what the checkpoint's state dict holds.
"""

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from kd_lab.errors import KDLabError, brief

# Lightning's special values of ckpt_path (not files)
CKPT_KEYWORDS = ("last", "best", "hpc")
LIGHTNING_KEY = "pytorch-lightning_version"
# what decides the keys and shapes of a run's state dict (teacher.model: when the scheme trains the teacher)
STATE_KEYS = ("task._target_", "scheme._target_", "algorithm._target_", "student.model")
MAX_SHOWN = 4


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not in the zip format that mmap needs (a legacy torch.save)
        pass
    except Exception as e:
        raise _unreadable(path, e) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise _unreadable(path, e) from e


def _unreadable(path: Path, e: Exception) -> KDLabError:
    return KDLabError(
        f"ckpt_path={path} cannot be read ({brief(e, sentence=True)}): it is truncated, corrupt or not a torch "
        "checkpoint; point it at a run's checkpoints/last.ckpt, or set ckpt_path=null to train from scratch."
    )


def check_resume_checkpoint(tree: dict[str, Any]) -> None:
    """Raise when ``tree['ckpt_path']`` is no Lightning checkpoint, or one of a run whose algorithm or models
    differ from this run's (``tree``: the resolved config)."""
    ckpt = tree.get("ckpt_path")
    if not ckpt or ckpt in CKPT_KEYWORDS or str(ckpt).startswith("registry") or not Path(ckpt).is_file():
        return  # a missing file is refused by the schema (kd_lab.run.checks.schema)
    path = Path(ckpt)
    checkpoint = _load(path)
    if not isinstance(checkpoint, dict) or LIGHTNING_KEY not in checkpoint:
        raise KDLabError(
            f"ckpt_path={path} holds {_what(checkpoint)}, not a Lightning checkpoint: ckpt_path resumes training "
            "from a Lightning checkpoint (a run's checkpoints/last.ckpt); to load a teacher's weights set "
            f"teacher.ckpt_path={path} (and ckpt_path=null)."
        )
    found = recorded_config(path)
    if found is None:
        return  # not written by a kd-lab run directory: Lightning compares the state dict itself
    source, theirs = found
    keys = STATE_KEYS
    if any(str(k).startswith("teachers.") for k in checkpoint.get("state_dict") or {}):
        keys = (*keys, "teacher.model")  # teachers that learn are in the state dict
    differences = _differences(keys, theirs, tree)
    if differences:
        shown = "; ".join(f"{k} is {_show(a)} there, {_show(b)} here" for k, a, b in differences[:MAX_SHOWN])
        more = f"; and {len(differences) - MAX_SHOWN} more" if len(differences) > MAX_SHOWN else ""
        raise KDLabError(
            f"ckpt_path={path} is a checkpoint of a run with another algorithm or model (its config: {source}): "
            f"{shown}{more}; set these keys as that run had them, continue that run with kd-lab "
            f"resume={source.parent}, or set ckpt_path=null to train from scratch."
        )


def _what(checkpoint: Any) -> str:
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return f"a plain state dict ({len(checkpoint)} tensors, e.g. '{next(iter(checkpoint))}')"
    if isinstance(checkpoint, dict):
        keys = sorted(map(str, checkpoint))
        return f"a dict with keys {keys[:MAX_SHOWN]}{' ...' if len(keys) > MAX_SHOWN else ''}"
    return f"a {type(checkpoint).__module__}.{type(checkpoint).__name__}"


def recorded_config(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(file, config)`` of the kd-lab run that wrote checkpoint ``path`` (``<run>/checkpoints/last.ckpt``,
    or a SLURM ``<run>/hpc_ckpt_<n>.ckpt``), resolved key by key; None when there is none."""
    for run_dir in (path.parent.parent, path.parent) if path.parent.name == "checkpoints" else (path.parent,):
        resume, results = run_dir / "resume.yaml", run_dir / "results.json"
        try:
            if resume.is_file():
                return resume, {"__omegaconf__": OmegaConf.load(resume)}
            if results.is_file():
                config = json.loads(results.read_text()).get("config")
                if isinstance(config, dict):
                    return results, {"__omegaconf__": OmegaConf.create(config)}
        except Exception:  # an unreadable record says nothing about the checkpoint
            return None
    return None


_MISSING = object()


def _value(tree: dict[str, Any], key: str) -> Any:
    """The resolved value at dotted ``key`` (``_MISSING`` when absent or unresolvable)."""
    if "__omegaconf__" in tree:
        node = tree["__omegaconf__"]
        try:
            value = OmegaConf.select(node, key, default=_MISSING, throw_on_missing=True)
            return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception:  # an interpolation of a resolver or key that is not there
            return _MISSING
    value: Any = tree
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _leaves(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_leaves(f"{key}.{k}", v))
        return out
    return {key: value}


def _differences(keys: tuple[str, ...], theirs: dict[str, Any], ours: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    differences = []
    for key in keys:
        a, b = _value(theirs, key), _value(ours, key)
        if a is _MISSING or b is _MISSING:
            continue  # not recorded (or not resolvable) on one side: nothing to compare
        left, right = _leaves(key, a), _leaves(key, b)
        for leaf in sorted(set(left) | set(right)):
            x, y = left.get(leaf, _MISSING), right.get(leaf, _MISSING)
            if x != y:
                differences.append((leaf, x, y))
    return differences


def _show(value: Any) -> str:
    return "absent" if value is _MISSING else repr(value) if isinstance(value, str) else str(value)
