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
