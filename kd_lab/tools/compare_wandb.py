"""``kd-lab-compare --wandb``: the comparison table as a ``wandb.Table``, with its plots, in a W&B run.

The run's mode follows the training runs' rule (``kd_lab.run.loggers.wandb_mode``): ``WANDB_MODE`` if set,
online with credentials and a reachable server, offline otherwise (upload later with ``wandb sync``).
Runs not in the table go into a second table, so the dashboard shows what is missing too.
"""

from pathlib import Path
from typing import Any


def log_comparison(
    rows: list[dict[str, Any]],
    problems: list[tuple[str, str]],
    plots: list[Path],
    project: str,
    group: str | None,
    name: str | None,
) -> str:
    """Log one ``compare`` run; returns its local directory."""
    import wandb

    from kd_lab.run.loggers import wandb_mode

    columns = list(rows[0]) if rows else []
    run = wandb.init(project=project, group=group, name=name, job_type="compare", mode=wandb_mode(None))
    try:
        payload: dict[str, Any] = {"comparison": wandb.Table(columns=columns, data=[list(r.values()) for r in rows])}
        payload["not_in_table"] = wandb.Table(columns=["run", "why"], data=[list(p) for p in problems])
        payload.update({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
        run.log(payload)
        return run.dir
    finally:
        run.finish()
