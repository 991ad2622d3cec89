"""kd-lab: knowledge distillation from composable Hydra configs, trained with Lightning."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# W&B job_type of a run: the vanilla student is the baseline every distilled run is compared to.
OmegaConf.register_new_resolver(
    "kd_job_type", lambda algorithm: "baseline" if algorithm == "none" else "distill", replace=True
)

# The Hydra run dir and output subdir of a resumed run (conf/hydra/default.yaml; kd_lab/run/resume.py):
# ``${kd_if_resume:${resume},<then>,<otherwise>}``. Registered here, so anything that imports kd_lab (a
# submitit job unpickling its config, a test composing it) can resolve it.
OmegaConf.register_new_resolver(
    "kd_if_resume", lambda resume, then, otherwise: otherwise if resume is None else then, replace=True
)


def short_name(text: str, limit: int = 64) -> str:
    """``text`` as one bounded, path-safe directory name: ``/`` becomes ``_``, and a name longer than ``limit``
    keeps its first ``limit - 9`` characters and ends with ``-`` and 8 hex digits of the whole text's SHA-1
    (two long names that share a beginning stay apart). Sweep job directories use it on Hydra's
    ``override_dirname`` (conf/hydra/default.yaml): Linux allows 255 bytes per name, and a grid of many long
    overrides made longer ones (``OSError: [Errno 36] File name too long``). The full overrides stay in each
    job's ``.hydra/overrides.yaml`` and ``results.json``."""
    import hashlib

    text = str(text).replace("/", "_")
    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{text[: limit - 9]}-{digest}"


OmegaConf.register_new_resolver("kd_short_name", short_name, replace=True)


def unique_dir(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ...: the first of them this call creates (``os.mkdir`` fails if it
    exists, so two processes never get the same one); its parents are created as needed. Run and sweep dirs
    are named to the second (conf/hydra/default.yaml): two runs with the same name started in the same second
    used to share one directory, and one run's results.json and checkpoints overwrote the other's."""
    import os

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{path}-{n}"


def run_dir(resume: str | None, path: str) -> str:
    """The Hydra run dir: the ``resume=`` directory as given (nothing created), else a new ``unique_dir``."""
    return unique_dir(path) if resume is None else resume


# Cached (use_cache): a config resolves its run or sweep dir once, and Hydra copies the cache into every job of a
# sweep (load_sweep_config) and pickles it with a job sent to a joblib or submitit worker, so every job of one
# sweep sees the directory created once. A DDP rank > 0 gets hydra.run.dir explicitly (kd_lab/run/ddp.py).
OmegaConf.register_new_resolver("kd_unique_dir", unique_dir, replace=True, use_cache=True)
OmegaConf.register_new_resolver("kd_run_dir", run_dir, replace=True, use_cache=True)
