"""``kd-lab-lifelong``: the Hydra app over conf/lifelong.yaml. A config mistake is one line on stderr and
exit status 1, found before torch is imported (the checks in kd_lab/lifelong/config.py need none). As with
kd-lab, such a run leaves no run directory behind."""

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import kd_lab  # noqa: F401  (registers the resolvers of the run directory)
from kd_lab.errors import KDLabError
from kd_lab.lifelong.config import check_config
from kd_lab.run.outcome import discard_unstarted_run
from kd_lab.run.train import CONFIG_DIR


def _discard(e: KDLabError) -> bool:
    """Remove the run directory Hydra made for a run stopped before compute; True if it was removed. It is
    kept when it holds anything but Hydra's files and the job's log (``discard_unstarted_run``)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    record = {"status": "failed", "stage": "checks", "error": f"{type(e).__name__}: {e}"}
    try:  # the record that discard_unstarted_run reads (kd-lab writes the same one for its runs)
        (run_dir / "results.json").write_text(json.dumps(record))
    except OSError:
        return False
    return discard_unstarted_run(run_dir, e, log_name=f"{hydra_cfg.job.name}.log") is not None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="lifelong")
def main(cfg: DictConfig) -> float | None:
    try:
        check_config(cfg)
    except KDLabError as e:
        where = "found before any compute, so no run directory was kept" if _discard(e) else "found before compute"
        print(f"kd-lab-lifelong: {e}\n({where})", file=sys.stderr)
        sys.exit(1)
    from kd_lab.lifelong.run import run_lifelong  # torch and Lightning: only for a config that is good

    try:
        return run_lifelong(cfg)["final_average_accuracy"]
    except KDLabError as e:  # found after the data load (a task without samples): the directory stays
        print(f"kd-lab-lifelong: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
