"""kd-lab: knowledge distillation from composable Hydra configs, trained with Lightning."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# W&B job_type of a run: the vanilla student is the baseline every distilled run is compared to.
OmegaConf.register_new_resolver(
    "kd_job_type", lambda algorithm: "baseline" if algorithm == "none" else "distill", replace=True
)
