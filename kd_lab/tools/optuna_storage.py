"""Where an Optuna search (``hparams_search=...``) keeps its study: a SQLite file.

hydra-optuna-sweeper opens the study (``optuna.create_study(storage=..., load_if_exists=True)``) before the
launcher creates the sweep directory, and SQLite cannot create a file in a missing directory; this makes
the directory first. A study stored this way is resumed by pointing a later search at the same file.
"""

from pathlib import Path


def sqlite_storage(path: str) -> str:
    """``path`` -> an SQLAlchemy URL for Optuna, with the file's directory created."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"
