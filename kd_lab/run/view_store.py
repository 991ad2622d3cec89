"""The teacher view store: a frozen teacher's outputs for every augmented training view, once per sweep.

Batch order and augmentation draws are a function of ``(seed, epoch, batch)`` (``kd_lab.data.batches``). So
every method of a sweep that uses the same teacher, data and seed asks the teacher about the same views.
The first run computes the teacher's outputs live, as usual, and writes each finished epoch to a file. Every
later run that asks the same reads them and skips the teacher's forward (Fast KD, Shen & Xing 2022, stores
soft labels per crop for the same reason).

What is stored, per epoch and per teacher: the logits of every batch (dense, in the logits' own dtype), or
``perf.view_store_topk`` of them as fp16 values and indices plus one fill logit that keeps the tail's mass,
and the features the algorithm taps. Dense logits are exact: a run that reads them computes what a run with
a live teacher computes, bit for bit on the same machine (tests/test_view_store.py). Top-k logits are not:
each view's top-k values are rounded to fp16 and the other classes share the tail's mass evenly. Every run
of a top-k store, the filling one included, sees the same reconstructed logits.

The key of a store is everything the stored numbers depend on: each teacher's weights (a hash of its state
dict), the training split's content, the data config (batch size, seed, augmentation), the taps, the storage
format, and the process (rank and world size, device type, precision, torch threads and version, the CPU's
instruction set). One directory per key holds one ``safetensors`` file per epoch and rank, written atomically.

Concurrent runs: the run that reaches an epoch first takes a lock file and fills it. A run that finds the
epoch locked by another live process computes its teacher live for that epoch and writes nothing. A lock left
by a dead process on this host is taken over.

The store refuses (``perf.view_store=true``) or stays off (``auto``, one log line) where it cannot be exact:
a scheme that trains the teacher, a student that sees another view than the teacher (cross-modal data), an
augmentation whose draws are not a function of the loader's generator (it must declare
``views_from_generator = True``), a data module with no ``augment`` attribute, or a store over
``perf.view_store_max_mb``.
"""

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kd_lab.errors import KDLabError
from kd_lab.losses.sparse import TopkSupport, attach_support
from kd_lab.utils.io import atomic_write_json, move_into_place

log = logging.getLogger(__name__)

KEY_VERSION = 1
_HELD_LOCKS: set[str] = set()  # lock files this process holds (a lock of our own pid not in it is stale)


# -- what a store depends on --------------------------------------------------------------------------------
def describe(obj) -> object:
    """A JSON-able description of a config object (an augmentation), its public attributes included."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list | tuple):
        return [describe(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, Tensor):
        return obj.tolist()
    public = {k: describe(v) for k, v in vars(obj).items() if not k.startswith("_")}
    return {"type": f"{type(obj).__module__}.{type(obj).__qualname__}", **public}


def tensor_digest(tensors: dict[str, Tensor], h=None) -> str:
    """A sha256 over names, dtypes, shapes and bytes: the identity of weights or of a data split."""
    h = h or hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def refusal(datamodule, scheme, algorithm, teachers: list[nn.Module], cache_teacher: bool) -> str | None:
    """Why a view store cannot serve this run exactly, or None when it can."""
    if not teachers or not algorithm.needs_teacher:
        return "the run has no teacher to store"
    if algorithm.synthesizes_inputs:
        return f"algorithm={algorithm.name} trains on synthetic inputs, not on the data's views"
    if scheme.trains_teacher:
        return f"scheme={scheme.name} trains the teacher, so its outputs change every step; use scheme=offline"
    if cache_teacher:
        return "perf.cache_teacher=true already computes the teacher once for the whole run"
    if not hasattr(datamodule, "augment") or not hasattr(datamodule, "splits"):
        return f"{type(datamodule).__name__} does not declare its augmentation (data.augment)"
    if datamodule.teacher_input_key != "input":
        return "the student sees another view of the data than the teacher (cross-modal data)"
    augment = datamodule.augment
    if augment is not None and not getattr(augment, "views_from_generator", False):
        return (
            f"data.augment ({type(augment).__name__}) does not declare that its draws come from the loader's "
            "generator only (class attribute views_from_generator = True), so its views may differ between runs"
        )
    return None


@dataclass(frozen=True)
class FitContext:
    """What the stored numbers depend on that only the trainer knows."""

    rank: int
    world_size: int
    device_type: str
    precision: str
    serving: str  # tensors / device / loader: the loader's workers draw augmentations from other generators

    @classmethod
    def of(cls, trainer, module) -> "FitContext":
        datamodule = trainer.datamodule
        serving = datamodule.serving_mode(module.device) if hasattr(datamodule, "serving_mode") else "-"
        return cls(trainer.global_rank, trainer.world_size, module.device.type, str(trainer.precision), serving)


# -- the store ----------------------------------------------------------------------------------------------
class ViewStore:
    """Teacher outputs per training view, read and written one epoch at a time.

    Args:
        root: the directory of all stores (``${paths.teacher_store}/views``).
        fixed_key: what the build knows: data config and content, taps, format.
        teachers: the frozen teachers; their weights are hashed at the first epoch (after the teacher store
            filled them).
        topk: store the top ``topk`` logits per view (fp16) and a tail fill value; None stores them dense.
        sample_bytes: the bytes one training view takes in the store, for the size check.
        max_mb: the largest store this run may write (all epochs); above it the store refuses or stays off.
        required: ``perf.view_store=true``: refuse (KDLabError) instead of staying off.
    """

    def __init__(
        self,
        root: Path,
        fixed_key: dict,
        teachers: list[nn.Module],
        topk: int | None,
        sample_bytes: int,
        max_mb: float,
        required: bool,
    ):
        self.root, self.fixed_key, self.teachers = Path(root), fixed_key, teachers
        self.topk, self.sample_bytes, self.max_mb, self.required = topk, sample_bytes, max_mb, required
        self.enabled = True
        self.directory: Path | None = None
        self.mode = "off"  # per epoch: read / fill / live
        self.epoch, self.num_batches = -1, 0
        self._read: dict[str, Tensor] = {}
        self._recorded: dict[int, tuple[list[Tensor], list[dict[str, Tensor]]]] = {}
        self._lock: Path | None = None
        self._checked = False  # one live comparison after the first stored batch a run reads
        self.stats = {"read": 0, "filled": 0, "live": 0}

    # -- epochs ----------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, num_batches: int, context: FitContext, max_epochs: int | None) -> None:
        if not self.enabled:
            return
        if self.directory is None:
            self._open(context, num_batches, max_epochs)
            if not self.enabled:
                return
        self.epoch, self.num_batches, self._recorded = epoch, num_batches, {}
        path = self._epoch_path(epoch, context)
        self._read = self._load(path, num_batches) if path.exists() else {}
        if self._read:
            self.mode = "read"
        elif self._try_lock(path.with_suffix(".lock")):
            self.mode = "fill"
        else:
            self.mode = "live"
        self._path = path
        self.stats[self.mode if self.mode != "fill" else "filled"] += 1

    def end_epoch(self) -> None:
        """Write the epoch just filled, if every batch of it was recorded; release its lock."""
        if self.mode == "fill":
            if len(self._recorded) == self.num_batches:
                self._write(self._path)
            self._release()
        self.mode, self._recorded, self._read = "off", {}, {}

    def close(self) -> None:
        """At the end of a fit, also one that failed: no lock is left behind."""
        self._release()
        self.mode = "off"

    # -- batches ---------------------------------------------------------------------------------------
    def lookup(self, batch_idx: int, device: torch.device) -> tuple[list[Tensor], list[dict[str, Tensor]]] | None:
        """The stored outputs of this epoch's batch ``batch_idx`` on ``device``, or None (compute them live)."""
        if self.mode != "read":
            return None
        logits, features = [], []
        for i in range(len(self.teachers)):
            if self.topk:
                values, index, fill = (self._read[f"t{i}.topk_{k}"][batch_idx] for k in ("values", "index", "fill"))
                values, index, fill = values.to(device), index.to(device), fill.to(device)
                dense = expand_topk(values, index, fill, self._classes[i])
                logits.append(attach_support(dense, TopkSupport(values, index, fill, self._classes[i])))
            else:
                logits.append(self._read[f"t{i}.logits"][batch_idx].to(device))
            prefix = f"t{i}.feat."
            features.append(
                {k[len(prefix) :]: v[batch_idx].to(device) for k, v in self._read.items() if k.startswith(prefix)}
            )
        return logits, features

    @property
    def needs_check(self) -> bool:
        """Whether the next stored batch should also be computed live and compared (once per run)."""
        return self.mode == "read" and not self._checked

    def check(self, stored: list[Tensor], live: list[Tensor]) -> None:
        """Compare a stored batch with the live teacher's: a mismatch means the key missed something."""
        self._checked = True
        for i, (s, z) in enumerate(zip(stored, live, strict=True)):
            z = self.view_of(z)
            if s.shape != z.shape or not torch.allclose(s.float(), z.float(), rtol=1e-4, atol=1e-4):
                raise KDLabError(
                    f"the teacher view store at {self._path} does not match teacher {i}'s live outputs on epoch "
                    f"{self.epoch}'s first batch (largest difference {(s.float() - z.float()).abs().max():.3g}). "
                    "Something the views depend on is not in the store's key (an augmentation with draws of its "
                    f"own?). Delete {self.directory} and rerun, or set perf.view_store=false."
                )

    def view_of(self, logits: Tensor) -> Tensor:
        """What every run of this store sees for live logits: themselves, or their top-k reconstruction."""
        if not self.topk:
            return logits
        values, index, fill = compress_topk(logits.detach(), self.topk)
        dense = expand_topk(values, index, fill, logits.shape[-1]).to(logits.dtype)
        return attach_support(dense, TopkSupport(values, index, fill, logits.shape[-1]))

    def record(self, batch_idx: int, logits: list[Tensor], features: list[dict[str, Tensor]]) -> None:
        if self.mode == "fill":
            self._recorded[batch_idx] = (
                [z.detach() for z in logits],
                [{k: v.detach() for k, v in f.items()} for f in features],
            )

    # -- files -----------------------------------------------------------------------------------------
    def _open(self, context: FitContext, num_batches: int, max_epochs: int | None) -> None:
        batch = self.fixed_key["batch_size"]
        total_mb = self.sample_bytes * batch * num_batches * (max_epochs or 1) / 2**20
        if total_mb > self.max_mb:
            reason = (
                f"the teacher view store would take {total_mb:.0f} MiB for {max_epochs} epochs, more than "
                f"perf.view_store_max_mb={self.max_mb:g}; store top-k logits (perf.view_store_topk=8), tap fewer "
                "features, or raise the limit"
            )
            self._disable(reason)
            return
        key = {
            **self.fixed_key,
            "version": KEY_VERSION,
            "teachers": [tensor_digest(t.state_dict()) for t in self.teachers],
            "world_size": context.world_size,
            "device_type": context.device_type,
            "precision": context.precision,
            "serving": context.serving,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            # torch picks its CPU kernels by the instruction set (AVX2, AVX512); they may add floats in another order
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.directory = self.root / digest
        self.directory.mkdir(parents=True, exist_ok=True)
        if not (self.directory / "key.json").exists():
            atomic_write_json(key, self.directory / "key.json")
        log.info(
            "teacher view store: %s, %.2f MiB per epoch, at most %.1f MiB for %s epochs",
            self.directory,
            self.sample_bytes * batch * num_batches / 2**20,
            total_mb,
            max_epochs,
        )

    def _disable(self, reason: str) -> None:
        if self.required:
            raise KDLabError(f"perf.view_store=true, but {reason}; or set perf.view_store=auto (used where it can be).")
        log.info("teacher view store off: %s", reason)
        self.enabled = False

    def _epoch_path(self, epoch: int, context: FitContext) -> Path:
        return self.directory / f"epoch_{epoch:05d}.rank{context.rank}.safetensors"

    def _load(self, path: Path, num_batches: int) -> dict[str, Tensor]:
        """The epoch file's tensors, or {} (and a warning) when it is damaged: the epoch is then filled again."""
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, RuntimeError) as e:
            log.warning("teacher view store: %s cannot be read (%s); its teacher outputs are computed again.", path, e)
            return {}
        first = tensors.get("t0.logits", tensors.get("t0.topk_values"))
        if first is None or first.shape[0] != num_batches:
            log.warning(
                "teacher view store: %s does not hold %d batches; its outputs are computed again.", path, num_batches
            )
            return {}
        if self.topk:
            self._classes = [int(tensors[f"t{i}.classes"]) for i in range(len(self.teachers))]
        return tensors

    def _write(self, path: Path) -> None:
        tensors: dict[str, Tensor] = {}
        order = sorted(self._recorded)
        for i in range(len(self.teachers)):
            logits = torch.stack([self._recorded[b][0][i] for b in order]).cpu()
            if self.topk:
                values, index, fill = compress_topk(logits, self.topk)
                tensors.update({f"t{i}.topk_values": values, f"t{i}.topk_index": index, f"t{i}.topk_fill": fill})
                tensors[f"t{i}.classes"] = torch.tensor(logits.shape[-1])
            else:
                tensors[f"t{i}.logits"] = logits
            for name in self._recorded[order[0]][1][i]:
                tensors[f"t{i}.feat.{name}"] = torch.stack([self._recorded[b][1][i][name] for b in order]).cpu()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            move_into_place(tmp, path)
        except OSError as e:  # a full disk: the run goes on with its live teacher, nothing half-written stays
            tmp.unlink(missing_ok=True)
            log.warning("teacher view store: could not write %s (%s); later runs compute this epoch again.", path, e)

    def _try_lock(self, lock: Path) -> bool:
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not _stale(lock):
                    return False
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            self._lock = lock
            _HELD_LOCKS.add(str(lock))
            return True
        return False

    def _release(self) -> None:
        if self._lock is not None:
            _HELD_LOCKS.discard(str(self._lock))
            self._lock.unlink(missing_ok=True)
            self._lock = None


def _stale(lock: Path) -> bool:
    """A lock of a process of this host that is gone (or of this process, but not held by it)."""
    try:
        host, pid = lock.read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False  # being written right now, or not ours to judge
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return str(lock) not in _HELD_LOCKS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# -- top-k logits -------------------------------------------------------------------------------------------
def compress_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest logits (fp16), their indices, and the logit that each other class gets so that the
    classes outside the top ``k`` keep their total probability at temperature 1."""
    k = min(k, logits.shape[-1])
    values, index = logits.float().topk(k, dim=-1)
    rest = logits.float().scatter(-1, index, float("-inf"))
    others = logits.shape[-1] - k
    fill = rest.logsumexp(-1) - torch.log(torch.tensor(float(max(others, 1))))
    idx_dtype = torch.int16 if logits.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
    return values.half(), index.to(idx_dtype), fill


def expand_topk(values: Tensor, index: Tensor, fill: Tensor, classes: int) -> Tensor:
    """Dense logits from ``compress_topk``'s output."""
    out = fill.float().unsqueeze(-1).expand(*fill.shape, classes).clone()
    return out.scatter(-1, index.long(), values.float())


class ViewStoreHooks(L.Callback):
    """Opens each training epoch of a store, writes it at the epoch's end, and releases its lock when the
    fit ends or fails (``DistillationModule.configure_callbacks`` adds it)."""

    def __init__(self, store: ViewStore):
        self.store = store

    def on_train_epoch_start(self, trainer, module) -> None:
        try:
            num_batches = len(trainer.train_dataloader)
        except TypeError:  # a loader of unknown length: its epochs cannot be matched to files
            self.store._disable("the training loader has no length")
            return
        self.store.begin_epoch(trainer.current_epoch, num_batches, FitContext.of(trainer, module), trainer.max_epochs)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.store.end_epoch()

    def on_fit_end(self, trainer, module) -> None:
        self.store.close()

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        self.store.close()


# -- the per-token top-k store of language models -------------------------------------------------------------
# Causal LM data without augmentation give the teacher the same input blocks every epoch and in every seed:
# only their order changes. So the teacher's outputs are a function of the training sample alone, and a
# store per (epoch, batch) would write the same numbers once per epoch in another order. This store is laid
# out per sample instead: one pass of the teacher over the training split, in fixed order, read by each
# batch's sample ``index`` in every epoch, every seed and every training batch size.
TOKEN_KEY_VERSION = 1
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.float32, torch.int16, torch.int32)}


def index_dtype(classes: int) -> torch.dtype:
    """The dtype compress_topk stores vocabulary ids in: int16 up to 32767 ids, int32 above."""
    return torch.int16 if classes <= torch.iinfo(torch.int16).max else torch.int32


def token_bytes(k: int, classes: int) -> int:
    """Bytes one token position takes in the top-k store: k fp16 values, k ids, one float32 fill logit."""
    return k * 2 + k * torch.tensor([], dtype=index_dtype(classes)).element_size() + 4


def check_topk(k: int | None, step, scheme) -> None:
    """Refuse, before any compute, a top-k store that cannot be built: k over the vocabulary, a learning teacher."""
    if k is None or not step.teachers or not step.algorithm.needs_teacher:
        return
    for i, shape in enumerate(step.teacher_logit_shapes):
        if k > shape[-1]:
            raise KDLabError(
                f"perf.view_store_topk={k} is larger than teacher {i}'s {shape[-1]} classes (its vocabulary); set "
                f"perf.view_store_topk to at most {shape[-1]} (8 to 128 is usual for a language model), or null "
                "to store dense logits."
            )
    if scheme.trains_teacher:
        raise KDLabError(
            f"perf.view_store_topk={k} stores a frozen teacher's top-k logits, but scheme={scheme.name} trains the "
            "teacher, so its outputs change every step; use scheme=offline, or set perf.view_store_topk=null."
        )


def token_store_for(step, datamodule, scheme, plan, root: Path) -> "TokenTopkStore | None":
    """The per-sample top-k store where it is exact (see above), or None: then the per-epoch ViewStore decides."""
    from kd_lab.core.step import teacher_role  # here: kd_lab.core must not import the run layer at load time

    k = plan.view_store_topk
    check_topk(k, step, scheme)
    if k is None or not getattr(datamodule, "teacher_outputs_per_sample", False):
        return None
    if refusal(datamodule, scheme, step.algorithm, step.teachers, plan.cache_teacher) is not None:
        return None  # view_store_for logs or raises the reason
    if any(r.paths for r in step.teacher_recorders):
        return None  # tapped teacher features: the per-epoch store keeps them with the logits
    train = datamodule.splits["train"]
    inputs = train[step.teacher_input_key]
    per_token = sum(token_bytes(k, shape[-1]) for shape in step.teacher_logit_shapes)
    total_mb = inputs.numel() * per_token / 2**20
    if total_mb > plan.view_store_max_mb:
        if plan.view_store is True:
            raise KDLabError(
                f"perf.view_store=true, but the top-{k} token store would take {total_mb:.0f} MiB, more than "
                f"perf.view_store_max_mb={plan.view_store_max_mb:g}; lower perf.view_store_topk or raise the limit."
            )
        log.info("teacher token store off: %.0f MiB > perf.view_store_max_mb", total_mb)
        return None
    fixed_key = {
        "data": {
            "type": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "train": tensor_digest(train),  # the token ids: the tokenizer, block size and split are in them
            "tokenizer": getattr(getattr(datamodule, "tokenizer", None), "fingerprint", None),
        },
        "fill_batch_size": datamodule.eval_batch_size,
        "format": f"top{k}",
        "channels_last": plan.channels_last,
        "teacher_inputs": step.teacher_input_key,
    }
    valid = step.task.valid_positions(train) if "target" in train else None
    return TokenTopkStore(
        root,
        fixed_key,
        inputs,
        valid,
        k,
        datamodule.eval_batch_size,
        lambda output, i: step.logits(output, teacher_role(i)),
    )


class TokenTopkStore:
    """Every teacher's top-k logits for every training token, on disk, memory-mapped, read by sample index.

    It has the interface of ``TeacherCache`` (``filled``, ``fill``, ``lookup``), so the step reads it as it
    reads the in-memory cache. ``fill`` runs at the first training step, after the teacher store gave the
    teachers their weights. It maps the store's files when they exist; else it takes the lock, runs the
    teachers over the training split, writes the files atomically and maps them. A run that finds the lock
    held by a live process computes the same numbers in memory and writes nothing.

    Positions that no loss reads (``valid`` false: target -100) hold a marker instead of the teacher's
    numbers: values 0, ids 0..k-1, fill 0, which rebuild to all-zero logits.
    """

    _try_lock = ViewStore._try_lock  # the same lock files as the per-epoch store
    _release = ViewStore._release

    def __init__(self, root, fixed_key, inputs, valid, k, batch_size, to_logits):
        self.root, self.fixed_key, self.inputs, self.valid = Path(root), fixed_key, inputs, valid
        self.k, self.batch_size, self.to_logits = k, batch_size, to_logits
        self.directory: Path | None = None
        self.tensors: list[dict[str, Tensor]] = []  # per teacher: values, index, fill (memory-mapped)
        self.classes: list[int] = []
        self._lock: Path | None = None
        self.stats = {"read": 0, "filled": 0, "live": 0}

    @property
    def filled(self) -> bool:
        return bool(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.tensors for t in d.values())

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes / max(self.inputs.numel(), 1)

    def _key(self, teachers: list[nn.Module], device: torch.device) -> dict:
        autocast = torch.is_autocast_enabled(device.type)
        return {
            **self.fixed_key,
            "version": TOKEN_KEY_VERSION,
            "teachers": [tensor_digest(t.state_dict()) for t in teachers],
            "device_type": device.type,
            "autocast": str(torch.get_autocast_dtype(device.type)) if autocast else None,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }

    @torch.no_grad()
    def fill(self, teachers: list[nn.Module], recorders, device: torch.device) -> None:
        if any(t.training for t in teachers):
            raise KDLabError("the teacher token store needs teachers in eval mode (a frozen, offline teacher).")
        key = self._key(teachers, device)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        self.directory = self.root / f"tokens-{digest}"
        if self._map(self.directory, len(teachers)):
            self.stats["read"] += 1
        elif self._try_lock(self.root / f"tokens-{digest}.lock"):
            try:
                computed = self._compute(teachers, device)
                self._write(computed, key)
            finally:
                self._release()
            if not self._map(self.directory, len(teachers)):  # a failed write: serve what was computed
                self.tensors = computed
            self.stats["filled"] += 1
        else:
            self.tensors = self._compute(teachers, device)
            self.stats["live"] += 1
        self.classes = [int(d["classes"]) for d in self.tensors]
        log.info(
            "teacher token store: %s (%s), top-%d, %d tokens, %.1f bytes per token, %.2f MiB",
            self.directory,
            next(k for k, v in self.stats.items() if v),
            self.k,
            self.inputs.numel(),
            self.bytes_per_token,
            self.nbytes / 2**20,
        )

    def _compute(self, teachers: list[nn.Module], device: torch.device) -> list[dict[str, Tensor]]:
        out = []
        for i, teacher in enumerate(teachers):
            parts: dict[str, list[Tensor]] = {"values": [], "index": [], "fill": []}
            classes = 0
            for start in range(0, len(self.inputs), self.batch_size):
                logits = self.to_logits(teacher(self.inputs[start : start + self.batch_size].to(device)), i)
                classes = logits.shape[-1]
                values, index, fill = (t.cpu() for t in compress_topk(logits, self.k))
                if self.valid is not None:  # the marker at positions no loss reads
                    skip = ~self.valid[start : start + self.batch_size].cpu()
                    values[skip] = 0
                    index[skip] = torch.arange(values.shape[-1], dtype=index.dtype)
                    fill[skip] = 0
                for name, t in zip(parts, (values, index, fill), strict=True):
                    parts[name].append(t)
            tensors = {name: torch.cat(ts) for name, ts in parts.items()}
            tensors["classes"] = torch.tensor([classes], dtype=torch.int32)
            out.append(tensors)
        return out

    def _write(self, tensors: list[dict[str, Tensor]], key: dict) -> None:
        """Raw little-endian files and a meta.json, in a temporary directory renamed when complete."""
        tmp = self.root / f".{self.directory.name}.{os.getpid()}.tmp"
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            meta = {}
            for i, d in enumerate(tensors):
                for name, t in d.items():
                    t.contiguous().numpy().tofile(tmp / f"t{i}.{name}.bin")
                    meta[f"t{i}.{name}"] = [str(t.dtype).removeprefix("torch."), list(t.shape)]
            atomic_write_json(meta, tmp / "meta.json")
            atomic_write_json(key, tmp / "key.json")
            os.rename(tmp, self.directory)
        except OSError as e:  # a full disk, or another process renamed first: nothing half-written stays
            log.warning("teacher token store: could not write %s (%s); later runs compute it again.", self.directory, e)
        finally:
            if tmp.exists():
                for f in tmp.iterdir():
                    f.unlink()
                tmp.rmdir()

    def _map(self, directory: Path, n_teachers: int) -> bool:
        """Memory-map the store's files (copy-on-write: the files are never changed); False when absent."""
        try:
            meta = json.loads((directory / "meta.json").read_text())
            self.tensors = []
            for i in range(n_teachers):
                d = {}
                for name in ("values", "index", "fill", "classes"):
                    dtype, shape = meta[f"t{i}.{name}"]
                    n = int(torch.Size(shape).numel())
                    path = str(directory / f"t{i}.{name}.bin")
                    d[name] = torch.from_file(path, shared=False, size=n, dtype=_DTYPES[dtype]).reshape(shape)
                self.tensors.append(d)
        except (OSError, KeyError, ValueError, RuntimeError):
            self.tensors = []
            return False
        return True

    def lookup(self, index: Tensor) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """Each teacher's logits for the samples ``index``, rebuilt dense and marked with their top-k support."""
        device = index.device
        rows = index.cpu()  # the files are mapped in host memory
        logits = []
        for d, classes in zip(self.tensors, self.classes, strict=True):
            values, ids, fill = (d[name].index_select(0, rows).to(device) for name in ("values", "index", "fill"))
            dense = expand_topk(values, ids, fill, classes)
            logits.append(attach_support(dense, TopkSupport(values, ids, fill, classes)))
        return logits, [{} for _ in self.tensors]
