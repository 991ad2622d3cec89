"""One test per bad input: each fails before any training with one KDLabError that names the problem and the
fix, and leaves everything already on disk as it was (docs/errors.md lists the same cases and messages)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import run_kd_lab
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from kd_lab.data.fake import FakeDataModule
from kd_lab.data.mnist1d import MNIST1dDataModule
from kd_lab.errors import KDLabError
from kd_lab.run.builders import build_model, group_options
from kd_lab.run.checkpoints import read_state_dict
from kd_lab.run.checks.schema import check_schema
from kd_lab.run.loggers import build_loggers
from kd_lab.run.train import CONFIG_DIR, train

GROUPS = ("data", "teacher", "student", "algorithm", "scheme", "optim", "trainer", "logger", "callbacks",
          "experiment", "debug")  # fmt: skip


@pytest.fixture
def on_disk(tmp_path):
    """Files a user already has (a note in the run dir, a teacher-store entry); ``check()`` asserts that the
    failed run left them intact, trained no teacher and wrote no results.json that says finished."""
    note = tmp_path / "run" / "notes.txt"
    entry = tmp_path / "teachers" / "mlp_large-000000000000" / "teacher.pt"
    for path, text in ((note, "mine"), (entry, "weights")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def check() -> None:
        assert note.read_text() == "mine" and entry.read_text() == "weights"
        assert sorted(p.name for p in (tmp_path / "teachers").iterdir()) == [entry.parent.name]  # none trained
        results = tmp_path / "run" / "results.json"
        assert not results.exists() or json.loads(results.read_text())["status"] == "failed"

    return check


def fails(cfg, *fragments: str) -> str:
    with pytest.raises(KDLabError) as err:
        train(cfg)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


# -- config groups and keys ----------------------------------------------------------------------------------
def test_unknown_group_option_lists_the_valid_ones():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"), pytest.raises(MissingConfigException) as err:
        compose("train", overrides=["algorithm=kdd"])
    message = str(err.value)
    assert "Could not find 'algorithm/kdd'" in message and "Available options in 'algorithm'" in message
    assert "\tkd\n" in message and "\tdkd\n" in message


@pytest.mark.slow
def test_unknown_group_option_on_the_command_line(tmp_path):
    proc = run_kd_lab(tmp_path, "algorithm=kdd", check=False)
    assert proc.returncode == 1
    assert "Could not find 'algorithm/kdd'" in proc.stderr and "\tkd\n" in proc.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "teachers").exists()


def test_misspelled_key_without_plus_is_refused_by_hydra(make_cfg):
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'algorithm.temprature'"):
        make_cfg("algorithm.temprature=4")


def test_misspelled_key_names_the_closest_valid_one(make_cfg, on_disk):
    fails(
        make_cfg("+algorithm.temprature=4"),
        "unknown key algorithm.temprature=4",
        "kd_lab.algorithms.KD takes ce_weight, kd_weight, name, temperature",
        "did you mean algorithm.temperature? Write algorithm.temperature=4 instead.",
    )
    on_disk()


def test_unknown_key_of_a_group_without_target(make_cfg, on_disk):
    fails(make_cfg("+teacher.max_epoch=3"), "unknown key teacher.max_epoch=3", "Write teacher.max_epochs=3 instead")
    on_disk()


def test_unknown_top_level_key(make_cfg, on_disk):
    fails(make_cfg("+sed=3"), "unknown key sed=3", "did you mean seed? Write seed=3 instead.")
    on_disk()


def test_mistyped_value_names_the_expected_type(make_cfg, on_disk):
    fails(
        make_cfg("algorithm.temperature=hot"),
        "algorithm.temperature='hot' has the wrong type: kd_lab.algorithms.KD takes float for temperature, not str",
        "e.g. algorithm.temperature=4.0 (the default)",
    )
    fails(make_cfg("teacher.max_epochs=2.5"), "teacher.max_epochs=2.5 has the wrong type", "takes int")
    on_disk()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("algorithm.temperature=-1", "algorithm.temperature=-1 is out of range: it must be > 0"),
        ("algorithm.temperature=0", "algorithm.temperature=0 is out of range: it must be > 0"),
        ("algorithm.kd_weight=-0.5", "algorithm.kd_weight=-0.5 is out of range: it must be >= 0 and finite"),
        ("optim.optimizer.lr=0", "optim.optimizer.lr=0 is out of range: it must be > 0 (the learning rate)"),
        ("teacher.optim.optimizer.lr=-1", "teacher.optim.optimizer.lr=-1 is out of range: it must be > 0"),
        ("optim.optimizer.weight_decay=-1e-4", "optim.optimizer.weight_decay=-0.0001 is out of range: it must be >= 0"),
        ("data.batch_size=0", "data.batch_size=0 is out of range: it must be >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is out of range: it must be >= 1"),
        ("seed=-1", "seed=-1 is out of range: it must be in [0, 2**32 - 1]"),
        # every float bound rejects inf and nan (a NaN loss at step 0 otherwise, after a teacher was trained)
        ("algorithm.temperature=inf", "algorithm.temperature=inf is out of range: it must be > 0 and finite"),
        ("algorithm.kd_weight=nan", "algorithm.kd_weight=nan is out of range: it must be >= 0 and finite"),
        ("optim.optimizer.lr=inf", "optim.optimizer.lr=inf is out of range: it must be > 0 (the learning rate)"),
    ],
)
def test_value_out_of_range(make_cfg, on_disk, override, expected):
    key = override.split("=")[0]
    fails(make_cfg(override), expected, f"; set e.g. {key}=")
    on_disk()


def test_target_that_cannot_be_imported(make_cfg, on_disk):
    fails(
        make_cfg("algorithm._target_=kd_lab.algorithms.KDD"),
        "algorithm._target_=kd_lab.algorithms.KDD cannot be imported",
        "fix the dotted path",
    )
    on_disk()


def test_unknown_extra_teacher(make_cfg, on_disk):
    fails(
        make_cfg("algorithm=multi_teacher", "algorithm.extra_teachers=[mlp_larg]"),
        "algorithm.extra_teachers names 'mlp_larg', which is no teacher config; did you mean mlp_large?",
    )
    on_disk()


def test_missing_resume_checkpoint(make_cfg, on_disk, tmp_path):
    fails(make_cfg(f"ckpt_path={tmp_path}/gone.ckpt"), f"ckpt_path={tmp_path}/gone.ckpt is not a checkpoint file")
    on_disk()


@pytest.mark.parametrize(
    ("chain", "scheme"),
    [
        (["chain=born_again"], ["scheme=online", "algorithm=codistillation"]),
        (["chain=teacher_assistant", "chain.assistants=[mlp_medium]"], ["scheme=self", "algorithm=byot"]),
    ],
)
def test_a_chain_under_another_scheme_than_offline(make_cfg, on_disk, chain, scheme):
    """Caught before the chain's first stage trains."""
    name, other = chain[0].split("=")[1], scheme[0].split("=")[1]
    fails(
        make_cfg(*chain, *scheme),
        f"chain={name} needs scheme=offline: each stage's student becomes the next stage's frozen teacher",
        f"drop scheme={other}.",
    )
    on_disk()


LM_MARKS = ("data.vocab_size", "kd_lab.data.text", "- text\n", "task.prompt_length")  # options only LM runs resolve
GLUE_MARKS = ("GLUEDataModule", "sequence_classifier", "data.metrics")  # options that only GLUE data can resolve


@pytest.mark.slow
def test_every_shipped_option_passes_the_schema(tmp_path):
    """No false alarms: every option of every group is valid. The i-th option of each group goes into the
    i-th composed config (the schema does not build, so odd pairings are fine): ~16 composes, not ~60.
    Experiments set keys of the groups they pick, so each is composed on its own."""
    options = {g: group_options(g) for g in GROUPS}  # "_name.yaml" files (conf/data/_serving.yaml) are parts
    experiments = [[f"experiment={name}"] for name in options.pop("experiment")]
    # GLUE options read keys that only GLUE data has (data.max_length, data.metrics): composed with GLUE data
    glue_only = {
        g: [n for n in names if any(k in (Path(CONFIG_DIR) / g / f"{n}.yaml").read_text() for k in GLUE_MARKS)]
        for g, names in options.items()
    }
    experiments += [["experiment=glue_sst2", f"{g}={n}"] for g, names in glue_only.items() for n in names]
    options = {g: [n for n in names if n not in glue_only[g]] for g, names in options.items()}
    # language-model options read keys that only text data has (data.vocab_size): composed with text data
    text_only = {
        g: [n for n in names if any(k in (Path(CONFIG_DIR) / g / f"{n}.yaml").read_text() for k in LM_MARKS)]
        for g, names in options.items()
    }
    experiments += [["experiment=lm", f"{g}={n}"] for g, names in text_only.items() for n in names]
    options = {g: [n for n in names if n not in text_only[g]] for g, names in options.items()}
    zipped = [
        [f"{g}={names[i]}" for g, names in options.items() if i < len(names)]
        for i in range(max(map(len, options.values())))
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for picked in zipped + experiments:
            check_schema(compose("train", overrides=[*picked, f"paths.output_dir={tmp_path}"]))


# -- taps and connectors: caught by the run's build (untrained teachers), before the store trains one -----
def test_tap_path_that_does_not_exist(make_cfg, on_disk):
    fails(
        make_cfg("algorithm=fitnet", "algorithm.student_tap=layer.0"),
        "student (MLP) has no module at path 'layer.0'",
        "Nearest valid paths: ['layers.0'",
    )
    on_disk()


def test_shapes_no_connector_can_bridge(make_cfg, on_disk):
    fails(
        make_cfg("algorithm=attention", "teacher=cnn1d_large"),
        "attention transfer needs spatial feature maps",
        "Pick algorithm=fitnet or kd",
    )
    on_disk()


# -- class counts and data -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["teacher.model.num_classes=7"], "the teacher outputs shape (2, 7) but the data has 10 classes: set"),
        (["student.model.num_classes=5"], "the student outputs shape (2, 5) but the data has 10 classes: set"),
        (["data=digits", "data.num_classes=3"], "targets span [0, 9] but the data declares 3 classes"),
    ],
)
def test_class_counts_that_disagree(make_cfg, on_disk, overrides, expected):
    fails(make_cfg(*overrides), expected)
    on_disk()


def test_input_shape_that_disagrees_with_the_data(make_cfg, on_disk):
    fails(
        make_cfg("data=digits", "data.input_shape=[1,8,9]"),
        "data split 'train': inputs of shape (1, 8, 8), but the data config declares (1, 8, 9)",
        "set data.input_shape=[1, 8, 8]",
    )
    on_disk()


def test_nan_or_inf_in_the_inputs(make_cfg, on_disk, monkeypatch):
    clean = FakeDataModule.load

    def poisoned(self):
        arrays = clean(self)
        arrays["train"][0][7, 0, 3] = float("inf")
        return arrays

    monkeypatch.setattr(FakeDataModule, "load", poisoned)
    fails(make_cfg(), "data split 'train': NaN or Inf in the inputs (first bad samples: [7])", "clean or regenerate")
    on_disk()


def test_truncated_mnist1d_cache(make_cfg, on_disk, tmp_path):
    cache = MNIST1dDataModule(data_dir=str(tmp_path / "data"), num_classes=10, input_shape=(1, 40)).cache_file
    cache.parent.mkdir(parents=True)
    torch.save({"x": torch.zeros(50, 40)}, cache)
    cache.write_bytes(cache.read_bytes()[:200])
    cfg = make_cfg("data=mnist1d")
    cfg.paths.data_dir = str(tmp_path / "data")
    fails(
        cfg,
        f"MNIST-1D cache file {cache} is unreadable (RuntimeError: PytorchStreamReader failed reading zip archive: "
        "failed finding central directory.): it is truncated or corrupt",
        f"delete it (rm {cache}) and the next run regenerates it",
    )
    assert len(cache.read_bytes()) == 200  # kept for the user to look at, not deleted behind their back
    on_disk()


def test_data_dir_that_is_a_file(make_cfg, on_disk, tmp_path):
    (tmp_path / "data").write_text("not a directory")
    cfg = make_cfg("data=mnist1d")
    cfg.paths.data_dir = str(tmp_path / "data")
    fails(cfg, f"data.data_dir={tmp_path / 'data'} cannot hold the MNIST-1D cache", "set paths.data_dir to a writable")
    on_disk()


# -- teacher checkpoints ------------------------------------------------------------------------------------
def test_teacher_checkpoint_of_another_architecture(make_cfg, on_disk, tmp_path):
    mlp = build_model(make_cfg().teacher.model)
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    fails(
        make_cfg("teacher=cnn1d_large", f"teacher.ckpt_path={tmp_path / 'mlp.pt'}"),
        "does not fit CNN1d (teacher.model): missing keys ['blocks.0.0.weight'",
        "unexpected keys ['layers.0.0.weight'",
        "pick the teacher config that wrote it",
    )
    on_disk()


def test_truncated_teacher_checkpoint(make_cfg, on_disk, tmp_path):
    torch.save(build_model(make_cfg().teacher.model).state_dict(), tmp_path / "t.pt")
    (tmp_path / "t.pt").write_bytes((tmp_path / "t.pt").read_bytes()[:300])
    fails(
        make_cfg(f"teacher.ckpt_path={tmp_path / 't.pt'}"),
        "cannot be read (RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central "
        "directory.): it is truncated, corrupt or not a torch checkpoint",
        "set teacher.ckpt_path=null to train the teacher",
    )
    on_disk()


def test_checkpoint_holding_python_objects(make_cfg, on_disk, tmp_path):
    weights = build_model(make_cfg().teacher.model).state_dict()
    torch.save({"state_dict": weights, "hparams": OmegaConf.create({"lr": 0.1})}, tmp_path / "pickled.ckpt")
    fails(
        make_cfg(f"teacher.ckpt_path={tmp_path / 'pickled.ckpt'}"),
        "holds a Python object (omegaconf.dictconfig.DictConfig) that safe loading",
        "save plain model.state_dict() instead",
    )
    on_disk()


def test_missing_teacher_checkpoint(make_cfg, on_disk, tmp_path):
    fails(make_cfg(f"teacher.ckpt_path={tmp_path}/nope.pt"), "nope.pt does not exist", "teacher.ckpt_path=null")
    fails(make_cfg(f"teacher.ckpt_path={tmp_path}"), "is a directory, not a checkpoint file")
    on_disk()


def test_corrupt_teacher_store_entry_names_the_entry_to_delete(tmp_path):
    entry = tmp_path / "mlp_large-abc"
    entry.mkdir()
    (entry / "meta.json").write_text("{}")
    (entry / "teacher.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(KDLabError, match=f"delete the teacher-store entry {entry} and the next run retrains it"):
        read_state_dict(entry / "teacher.pt")


# -- W&B online with no key or no network ----------------------------------------------------------------
@pytest.mark.parametrize("api_key", [None, "0" * 40])
def test_wandb_online_without_key_or_server_falls_back_to_offline(make_cfg, monkeypatch, caplog, tmp_path, api_key):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    if api_key:
        monkeypatch.setenv("WANDB_API_KEY", api_key)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (logger,) = build_loggers(make_cfg("logger=wandb").logger)
    assert logger._wandb_init["mode"] == "offline"  # what wandb.init receives (the run is created lazily)
    expected = "no API key" if api_key is None else "W&B server http://127.0.0.1:9 unreachable within 2 s"
    assert expected in caplog.text and "logging offline" in caplog.text and "wandb sync" in caplog.text
