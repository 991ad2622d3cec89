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
