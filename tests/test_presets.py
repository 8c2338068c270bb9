"""Every preset the CLI lists as runnable validates; one that cannot run yet says why."""

from resnet_jax.cli import main
from resnet_jax.config import available_presets, preset_obstacle


def test_only_presets_that_can_run_are_listed_as_runnable(capsys):
    obstacles = {name: preset_obstacle(name) for name in available_presets()}
    assert {n for n, why in obstacles.items() if why} == {"imagenet_resnet50"}
    assert "streaming input pipeline" in obstacles["imagenet_resnet50"]
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "cifar10_resnet110" in listed and "quick" in listed
    assert [ln for ln in listed if "cannot run yet" in ln] == [
        f"imagenet_resnet50  (cannot run yet: {obstacles['imagenet_resnet50']})"]
    # Refused before anything is built: exit 2 and the same reason.
    assert main(["train", "--config", "imagenet_resnet50", "--workdir", "/nonexistent/x"]) == 2
    assert "streaming input pipeline" in capsys.readouterr().err
