"""Every preset validates and the CLI lists it as runnable; ImageNet without its data says
where to put it."""

from resnet_jax.cli import main
from resnet_jax.config import available_presets, preset_obstacle


def test_every_preset_is_runnable(capsys):
    obstacles = {name: preset_obstacle(name) for name in available_presets()}
    assert "imagenet_resnet50" in obstacles
    assert {n: why for n, why in obstacles.items() if why} == {}
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "cifar10_resnet110" in listed and "imagenet_resnet50" in listed
    assert not [ln for ln in listed if "cannot run" in ln]


def test_imagenet_without_data_names_both_ways_to_provide_it(tmp_path, capsys, monkeypatch):
    """No prepared TFDS copy and no TensorFlow here: exit 2 at once, naming TFDS preparation and
    the class-folder source (not an archive, which ImageNet has none of)."""
    monkeypatch.setattr("resnet_jax.data.tfds_source.tensorflow_available", lambda: False)
    code = main(["train", "--config", "imagenet_resnet50", "--workdir", str(tmp_path / "run"),
                 f"--config.data.data_dir={tmp_path / 'tfds'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "not prepared" in err and "resnet-jax[prepare]" in err
    assert "--config.data.source=folder" in err and "source='archive'" not in err
