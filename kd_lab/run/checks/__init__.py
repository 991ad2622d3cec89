"""The typed schema behind ``kd_lab.run.checks.schema.validate_config``: accepted keys and types from the signature of
each node's ``_target_`` (``signatures``), dataclasses for the groups that have no target (``groups``), the
value ranges (``ranges``), the algorithm x scheme x task pairing (``compatibility``), the GPUs the trainer asks
for (``devices``) and the Lightning checkpoint ``ckpt_path`` continues (``checkpoint``). Nothing is built
here: the run's one build, with untrained teachers (``kd_lab.run.assemble.build_run``), checks the rest."""
