"""The depth ablation: the grid end to end on a tiny setting, the report, the paper's table."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

# A tiny grid: ResNet-8/14 and their plain twins on the bundled sample, 4 steps each.
TINY = ["--config.train.batch_size=32", "--config.train.num_steps=4",
        "--config.train.log_every=2", "--config.train.eval_every=4",
        "--config.train.checkpoint_every=2", "--config.train.eval_batch_size=200",
        "--config.train.async_checkpoints=false", "--config.train.eval_splits=('test',)",
        "--config.optim.warmup_steps=0"]
NAMES = ["plain8_seed0", "plain14_seed0", "residual8_seed0", "residual14_seed0"]
REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/he2015-cifar10.md"


def _image_ok(path: Path) -> None:
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 200, path
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, f"{path} is (nearly) one colour"


@pytest.fixture(scope="module")
def grid(tmp_path_factory, sample_dataset):
    """The tiny grid, trained once for the module."""
    from resnet_jax.ablation.grid import run_grid

    root = tmp_path_factory.mktemp("grid")
    result = run_grid("quick", root, [8, 14], ["plain", "residual"], [0], TINY,
                      dataset=sample_dataset, interactive=False, log=lambda s: None)
    return root, result


def test_grid_runs_every_cell(grid):
    root, result = grid
    assert sorted(result["ran"]) == sorted(NAMES) and result["skipped"] == []
    for name in NAMES:
        cfg = json.loads((root / name / "config.json").read_text())
        kind, depth = re.fullmatch(r"([a-z]+)(\d+)_seed0", name).groups()
        assert cfg["model"]["depth"] == int(depth)
        assert cfg["model"]["family"] == {"plain": "cifar_plain", "residual": "cifar_resnet"}[kind]
        # Every checkpoint is kept for the gradient-norm plot.
        assert sorted(p.name for p in (root / name / "checkpoints").iterdir()) == ["2", "4"]


def test_report_table_csv_and_figures(grid):
    from resnet_jax.ablation.report import read_metrics, write_report

    root, _ = grid
    paths = write_report(root, max_examples=200)
    out = root / "report"
    assert {p.name for p in paths} == {"table6.md", "table6.csv", "figure6.png", "figure7.png",
                                       "gradient_norms.png"}
    with open(out / "table6.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kind"], int(r["depth"])) for r in rows] == [
        ("plain", 8), ("plain", 14), ("residual", 8), ("residual", 14)]
    for r in rows:
        metrics = read_metrics(root / f"{r['kind']}{r['depth']}_seed0" / "metrics.jsonl")
        assert float(r["test_error_mean"]) == pytest.approx(metrics["test"][4]["error"], abs=1e-3)
        assert float(r["test_error_best"]) == pytest.approx(metrics["test"][4]["error"], abs=1e-3)
        assert float(r["train_error_mean"]) == pytest.approx(metrics["train"][4]["error"],
                                                             abs=1e-3)
        assert float(r["test_error_std"]) == 0.0 and r["finished"] == "1"
        assert r["paper_error"] == ""  # a Fashion-MNIST run is not compared with CIFAR-10
    # Option A shortcuts add no parameters: each plain net and its residual twin are the same size.
    params = {(r["kind"], int(r["depth"])): int(r["params"]) for r in rows}
    assert params[("plain", 8)] == params[("residual", 8)] < params[("plain", 14)]
    md = (out / "table6.md").read_text()
    assert md.count("| plain |") >= 2 and md.count("| ResNet |") >= 2
    for name in ("figure6.png", "figure7.png", "gradient_norms.png"):
        _image_ok(out / name)
    analysis = json.loads((root / "plain14_seed0" / "analysis.json").read_text())
    assert len(analysis["responses"]["std"]) == 12  # 6n = 12 block layers of a depth-14 net
    assert analysis["gradients"]["steps"] == [2, 4]
    assert len(analysis["gradients"]["norms"][0]) == 13  # the stem + 12 block convs


def test_rerun_runs_nothing_new(grid):
    from resnet_jax.cli import main

    root, _ = grid
    before = {n: (root / n / "metrics.jsonl").read_bytes() for n in NAMES}
    argv = ["ablate", "--config", "quick", "--workdir", str(root), "--depths", "8,14",
            "--kinds", "plain,residual", "--seeds", "0", *TINY]
    assert main(argv) == 0
    assert {n: (root / n / "metrics.jsonl").read_bytes() for n in NAMES} == before


def test_paper_table_matches_reference():
    from resnet_jax.ablation.paper import TABLE6, paper_row

    expected = {20: (0.27, 8.75), 32: (0.46, 7.51), 44: (0.66, 7.17), 56: (0.85, 6.97),
                110: (1.7, 6.43), 1202: (19.4, 7.93)}
    assert {d: (r.params_m, r.error) for d, r in TABLE6.items()} == expected
    assert (TABLE6[110].mean, TABLE6[110].std, TABLE6[110].runs) == (6.61, 0.16, 5)
    assert paper_row("plain", 20) is None and paper_row("residual", 56).error == 6.97
    if REFERENCE.exists():  # the shared reference file, when this checkout sits beside it
        text = REFERENCE.read_text()
        for depth, (params, error) in expected.items():
            assert re.search(rf"\| ResNet \| {depth} \| {params}M \| {error}", text), depth


def test_grid_rejects_bad_input(tmp_path):
    from resnet_jax.ablation.grid import run_grid
    from resnet_jax.config import ConfigError

    with pytest.raises(ConfigError, match="kinds"):
        run_grid("quick", tmp_path, [8], ["highway"], [0])
    with pytest.raises(ConfigError, match="depths"):
        run_grid("quick", tmp_path, [8], ["plain"], [0], ["--config.model.depth=14"])
    with pytest.raises(ConfigError, match="depth"):
        run_grid("quick", tmp_path, [9], ["plain"], [0])
