"""The typed schema behind ``kd_lab.run.checks.schema.validate_config``: accepted keys and types from the signature of
each node's ``_target_`` (``signatures``), dataclasses for the groups that have no target (``groups``), the
value ranges (``ranges``) and a build of the run with untrained teachers (``dry_build``)."""
