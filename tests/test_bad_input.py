"""Bad configs and inputs through `resnet-jax`: one paragraph naming the key, exit 2, no traceback.

Every case fails before a model is built (the test patches the model graph construction to blow
up), so the table runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import resnet_jax.train.loop as loop
from resnet_jax.cli import main
from resnet_jax.config import ConfigError, load_config
from resnet_jax.train.loop import config_to_dict


class ModelWasBuilt(BaseException):  # noqa: N818 - BaseException: the CLI must not swallow it
    """Raised if a case got as far as building the model: validation came too late."""


@pytest.fixture(autouse=True)
def no_model_building(monkeypatch):
    def fail(*args, **kwargs):
        raise ModelWasBuilt("a bad input reached model construction")

    monkeypatch.setattr(loop, "graphdefs", fail)


def _empty(tmp: Path) -> dict:
    (tmp / "empty_data").mkdir()
    return {"data_dir": tmp / "empty_data"}


def _under_a_file(tmp: Path) -> dict:
    (tmp / "a_file").write_text("not a directory")
    return {"workdir": tmp / "a_file" / "run"}


def _run_of_depth_8(tmp: Path) -> dict:
    workdir = tmp / "old_run"
    workdir.mkdir()
    config = load_config("quick", ["model.depth=8"])
    (workdir / "config.json").write_text(json.dumps(config_to_dict(config)))
    return {"workdir": workdir}


def _config_file(body: str):
    def setup(tmp: Path) -> dict:
        (tmp / "my_config.py").write_text(body)
        return {"config_file": tmp / "my_config.py"}

    return setup


def _run_with_cut_config(tmp: Path) -> dict:
    workdir = tmp / "cut_run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"model": {"depth"')  # killed mid-write (old version)
    return {"workdir": workdir}


# (id, command-line arguments after `train --workdir W`, substrings the message must contain,
#  optional setup(tmp_path) -> {"workdir": ..., "data_dir": ...})
CASES = [
    ("unknown model family", ["--config.model.family=resnext"],
     ["config.model.family='resnext'", "cifar_resnet", "imagenet_resnet"], None),
    ("depth not 6n+2", ["--config.model.depth=21"], ["config.model.depth", "6n+2", "20, 32"], None),
    ("imagenet depth", ["--config.model.family=imagenet_resnet", "--config.model.depth=20"],
     ["config.model.depth=20", "50"], None),
    ("negative learning rate", ["--config.optim.learning_rate=-0.1"],
     ["config.optim.learning_rate=-0.1", "finite number > 0"], None),
    ("NaN learning rate", ["--config.optim.learning_rate=nan"],
     ["config.optim.learning_rate=nan", "finite number > 0"], None),
    ("batch not divisible by devices", ["--config.train.batch_size=36"],
     ["config.train.batch_size=36", "divisible by the number of devices (8)"], None),
    ("eval batch not divisible", ["--config.train.eval_batch_size=100"],
     ["config.train.eval_batch_size=100", "divisible by the number of devices (8)"], None),
    ("unknown dataset", ["--config.data.name=cifar11"],
     ["config.data.name='cifar11'", "did you mean cifar10", "imagenet2012"], None),
    ("dataset missing offline",
     ["--config.data.name=cifar10", "--config.data.source=archive",
      "--config.data.data_dir={data_dir}"],
     ["'cifar10'", "cifar-10-binary.tar.gz", "{data_dir}", "config.data.data_dir"], _empty),
    ("workdir not writable", [], ["--workdir {workdir}", "not writable"], _under_a_file),
    ("resume with a different model", ["--config.model.depth=14"],
     ["model.depth: 8 -> 14", "--allow-config-change"], _run_of_depth_8),
    ("unknown key, close match", ["--config.optim.learning_rat=0.1"],
     ["'optim.learning_rat'", "Did you mean: optim.learning_rate"], None),
    ("bad override type", ["--config.train.batch_size=big"],
     ["config.train.batch_size='big'", "not a valid int"], None),
    ("bad bool override", ["--config.train.async_checkpoints=maybe"],
     ["config.train.async_checkpoints='maybe'", "true or false"], None),
    ("override without a value", ["--config.train.batch_size"],
     ["'train.batch_size'", "--config.section.key=value"], None),
    ("override of a section", ["--config.train=3"], ["'train' is a section"], None),
    ("unknown optimiser", ["--config.optim.name=rmsprop"],
     ["config.optim.name='rmsprop'", "sgd", "adamw"], None),
    ("unknown schedule", ["--config.optim.schedule=linear"],
     ["config.optim.schedule='linear'", "piecewise", "cosine"], None),
    ("bad shortcut", ["--config.model.shortcut=D"], ["config.model.shortcut='D'", "'A'"], None),
    ("unknown preset", ["--config=quik"], ["'quik'", "Did you mean quick"], None),
    ("missing config file", ["--config=/nonexistent/my_config.py"],
     ["/nonexistent/my_config.py", "no such file"], None),
    ("eval split name", ["--config.train.eval_splits=('val',)"],
     ["config.train.eval_splits=('val',)", "'validation', 'test'"], None),
    ("negative weight decay", ["--config.optim.weight_decay=-1e-4"],
     ["config.optim.weight_decay=-0.0001", ">= 0"], None),
    ("zero steps", ["--config.train.num_steps=0"], ["config.train.num_steps=0", "> 0"], None),
    ("steps_per_call not dividing log_every", ["--config.train.steps_per_call=3"],
     ["config.train.log_every=20", "multiple of train.steps_per_call=3"], None),
    ("float16 without loss scale", ["--config.model.dtype=float16"],
     ["config.model.dtype='float16'", "config.train.loss_scale"], None),
    ("unknown dtype", ["--config.model.dtype=float8"], ["config.model.dtype='float8'", "bfloat16"],
     None),
    ("momentum of 1", ["--config.optim.momentum=1.0"], ["config.optim.momentum=1.0", "[0, 1)"],
     None),
    ("decreasing boundaries", ["--config.optim.boundaries=(48000,32000)"],
     ["config.optim.boundaries=(48000, 32000)", "increasing"], None),
    ("unknown normalisation", ["--config.data.normalization=zscore"],
     ["config.data.normalization='zscore'", "per_channel"], None),
    ("negative validation size", ["--config.data.validation_size=-5"],
     ["config.data.validation_size=-5", ">= 0"], None),
    ("learning rate beyond float32", ["--config.optim.learning_rate=1e308"],
     ["config.optim.learning_rate=1e+308", "largest float32"], None),
    ("config file that raises", ["--config={config_file}"],
     ["--config {config_file}: importing it raised ZeroDivisionError"],
     _config_file("x = 1 / 0\n")),
    ("config file returning a dict", ["--config={config_file}"],
     ["--config {config_file}: get_config() returned a dict", "ConfigDict"],
     _config_file("def get_config():\n    return {'model': {}}\n")),
    ("get_config that raises", ["--config={config_file}"],
     ["--config {config_file}: get_config() raised KeyError"],
     _config_file("def get_config():\n    return {}['model']\n")),
    ("config file without get_config", ["--config={config_file}"],
     ["--config {config_file} has no get_config() function"], _config_file("X = 1\n")),
    ("run with a cut config.json", [],
     ["{workdir}/config.json is not a valid JSON run config", "--allow-config-change"],
     _run_with_cut_config),
]


def _fill(text: str, values: dict) -> str:
    return text.format(**{k: str(v) for k, v in values.items()})


@pytest.mark.parametrize("args,expected,setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_value_gives_one_paragraph(tmp_path, capsys, args, expected, setup):
    values = {"workdir": tmp_path / "run", "data_dir": "", "config_file": ""}
    if setup is not None:
        values.update(setup(tmp_path))
    argv = ["train", "--workdir", str(values["workdir"]), *(_fill(a, values) for a in args)]
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in out.err and "Traceback" not in out.out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err  # one paragraph
    assert lines[0].startswith("error: ")
    for text in expected:
        assert _fill(text, values) in lines[0], lines[0]


def test_case_table_is_large_enough():
    assert len(CASES) >= 20


ARGUMENT_CASES = [
    (["ablate", "--workdir", "{tmp}", "--depths", ","], "argument --depths: ',' is an empty list"),
    (["ablate", "--workdir", "{tmp}", "--kinds", ""], "argument --kinds: '' is an empty list"),
    (["ablate", "--workdir", "{tmp}", "--seeds", "0,-1"], "argument --seeds: -1 is not valid"),
    (["ablate", "--workdir", "{tmp}", "--depths", "20,x"],
     "argument --depths: '20,x' is not a comma-separated list"),
    (["predict", "--model", "m", "--batch-size", "0", "x.png"],
     "argument --batch-size: must be at least 1, got 0"),
    (["predict", "--model", "m", "--batch-size", "-5", "x.png"],
     "argument --batch-size: must be at least 1, got -5"),
    (["predict", "--model", "m", "--top-k", "0", "x.png"],
     "argument --top-k: must be at least 1, got 0"),
    (["evaluate", "--workdir", "{tmp}", "--step", "-1"], "argument --step: must be at least 0"),
    (["report", "{tmp}", "--max-examples", "0"], "argument --max-examples: must be at least 1"),
]


@pytest.mark.parametrize("argv, expected", ARGUMENT_CASES,
                         ids=[" ".join(c[0]).replace(" {tmp}", "") for c in ARGUMENT_CASES])
def test_bad_option_value_is_refused_before_anything_runs(tmp_path, capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err, err
    assert err.strip().splitlines()[-1].startswith("resnet-jax ")  # argparse's `prog: error:`
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="config.model.depth"):
        main(["--debug", "train", "--workdir", str(tmp_path), "--config.model.depth=21"])


def test_predict_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    pytest.importorskip("resnet_jax.inference.cli")
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG not really")
    rc = main(["predict", "--workdir", str(tmp_path / "nowhere"), str(image)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such run directory "
                                        "or exported model file."]
