"""The depth ablation: the grid end to end on a tiny setting, the report, the paper's table."""

import csv
import json
import re
import shutil
from pathlib import Path

import jax
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
    from resnet_jax.ablation.report import write_report
    from resnet_jax.rundir.metrics import metrics_by_split

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
        metrics = metrics_by_split(root / f"{r['kind']}{r['depth']}_seed0")
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


def test_rerun_resumes_an_interrupted_cell(grid, sample_dataset, tmp_path, capsys):
    from resnet_jax.ablation.grid import run_grid
    from resnet_jax.train import restore_run

    root, _ = grid
    cell = tmp_path / "residual8_seed0"
    shutil.copytree(root / "residual8_seed0", cell)
    # Interrupted after its step-2 checkpoint: step 4 and everything logged after step 2 lost.
    shutil.rmtree(cell / "checkpoints" / "4")
    lines = (cell / "metrics.jsonl").read_text().splitlines()
    (cell / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in lines if json.loads(line)["step"] <= 2))
    result = run_grid("quick", tmp_path, [8], ["residual"], [0], TINY, dataset=sample_dataset,
                      interactive=False, log=lambda s: None)
    assert result == {"ran": ["residual8_seed0"], "skipped": []}
    assert f"Resumed {cell} from step 2." in capsys.readouterr().out
    def records(text: str) -> list[tuple[str, int]]:
        return [(r["split"], r["step"]) for r in map(json.loads, text.splitlines())]

    # Each record once, in order: steps 1-2 were not trained (and logged) again.
    assert records((cell / "metrics.jsonl").read_text()) == records("\n".join(lines))
    # The resumed cell ends where the uninterrupted one did, bit for bit.
    resumed, original = restore_run(cell)[2], restore_run(root / "residual8_seed0")[2]
    assert int(resumed.step) == int(original.step) == 4
    for a, b in zip(jax.tree.leaves(resumed.as_dict()), jax.tree.leaves(original.as_dict()),
                    strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _made_up_run(root: Path, kind: str, depth: int, seed: int, test_error: float,
                 train_error: float, last_step: int = 10) -> None:
    """A run directory as the report reads it: config.json and metrics.jsonl, no checkpoints."""
    run = root / f"{kind}{depth}_seed{seed}"
    run.mkdir(parents=True)
    family = {"plain": "cifar_plain", "residual": "cifar_resnet"}[kind]
    (run / "config.json").write_text(json.dumps({
        "model": {"family": family, "depth": depth, "shortcut": "", "scan_blocks": False},
        "train": {"seed": seed, "num_steps": 10}, "data": {"name": "cifar10"}}))
    records = [{"step": 5, "split": "test", "error": 50.0},  # an earlier evaluation: not final
               {"step": last_step, "split": "train", "error": train_error},
               {"step": last_step, "split": "test", "error": test_error}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_statistics_over_three_seeds(tmp_path, monkeypatch):
    from resnet_jax.ablation import report
    from resnet_jax.ablation.report import collect_runs, markdown_table, table6

    # Building ResNet-110 to count its parameters takes seconds; the count is checked elsewhere.
    monkeypatch.setattr(report, "count_params", lambda *args, **kwargs: 1_000_000)
    for seed, (test, train) in enumerate([(9.0, 1.0), (7.0, 2.0), (8.0, 4.5)]):
        _made_up_run(tmp_path, "residual", 20, seed, test, train)
    for seed, test in enumerate([8.0, 6.0, 7.0]):
        _made_up_run(tmp_path, "residual", 110, seed, test, 0.5)
    _made_up_run(tmp_path, "residual", 110, 3, 1.0, 0.5, last_step=5)  # still running
    rows = {r["depth"]: r for r in table6(collect_runs(tmp_path))}
    r20, r110 = rows[20], rows[110]
    assert (r20["seeds"], r20["finished"], r110["seeds"], r110["finished"]) == (3, 3, 4, 3)
    # 7, 8, 9: mean 8, sample std (ddof=1) 1 (the population std would be 0.816), best 7.
    assert (r20["test_error_mean"], r20["test_error_std"], r20["test_error_best"]) == \
        pytest.approx((8.0, 1.0, 7.0))
    assert r20["train_error_mean"] == pytest.approx(2.5)
    # Table 6: ResNet-20 8.75; ResNet-110 6.43 (best of 5), mean 6.61 over those runs.
    assert (r20["diff_mean"], r20["diff_best"]) == pytest.approx((8.0 - 8.75, 7.0 - 8.75))
    assert (r110["test_error_mean"], r110["test_error_std"], r110["test_error_best"]) == \
        pytest.approx((7.0, 1.0, 6.0))
    assert (r110["diff_mean"], r110["diff_best"]) == pytest.approx((7.0 - 6.61, 6.0 - 6.43))
    md = markdown_table(list(rows.values()))
    assert "| 8.00 ± 1.00 (3) | 7.00 | 8.75 | -0.75 |" in md
    assert "| 7.00 ± 1.00 (3) | 6.00 | 6.43 (best of 5; mean 6.61 ± 0.16) | +0.39 |" in md


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


def test_a_second_ablate_on_a_grid_in_use_is_refused(tmp_path, capsys):
    """The grid root is locked while `ablate` runs: a second one exits 2 naming the first."""
    from resnet_jax.cli import main
    from resnet_jax.rundir.lock import WorkdirLock

    with WorkdirLock(tmp_path, what="ablate"):
        rc = main(["ablate", "--config", "quick", "--workdir", str(tmp_path), "--depths", "8",
                   "--kinds", "plain", "--seeds", "0", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: --workdir {tmp_path} is in use by another run: pid ")
    assert not (tmp_path / "plain8_seed0").exists()  # no run was started


def test_report_states_how_the_runs_were_trained(tmp_path, monkeypatch):
    """Above the table: data, schedule (per net where nets differ), hardware, seeds and packing,
    and wall time with each packed program counted once."""
    from resnet_jax.ablation import report

    monkeypatch.setattr(report, "count_params", lambda *args, **kwargs: 1_000_000)
    optim = {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "learning_rate": 0.1,
             "schedule": "piecewise", "boundaries": [8000, 12000], "decay_factor": 0.1,
             "warmup": "none", "warmup_steps": 0}
    data = {"name": "cifar10", "source": "folder", "data_dir": "/data/cifar10-jpeg.tar.gz",
            "validation_size": 5000, "split_seed": 0, "normalization": "mean_image", "pad": 4,
            "crop": True, "flip": True}
    versions = {"jax": "0.10.2", "devices": ["cuda:0"], "device_kind": "NVIDIA H200",
                "backend": "xla_gpu", "process_count": 1}
    names = [f"residual20_seed{s}" for s in range(3)]
    for depth, seeds in ((20, range(3)), (110, range(1))):
        for seed in seeds:
            _made_up_run(tmp_path, "residual", depth, seed, 8.0 + seed, 1.0)
            run = tmp_path / f"residual{depth}_seed{seed}"
            cfg = json.loads((run / "config.json").read_text())
            cfg["model"]["dtype"] = "float32"
            cfg["data"] = data
            cfg["optim"] = {**optim, **({"warmup": "constant", "warmup_steps": 400,
                                         "warmup_learning_rate": 0.01} if depth == 110 else {})}
            cfg["train"].update(batch_size=128)
            (run / "config.json").write_text(json.dumps(cfg))
            packed = [n for n in names if n != run.name] if depth == 20 else []
            (run / "versions.json").write_text(json.dumps({**versions, "packed_with": packed}))
            lines = (run / "metrics.jsonl").read_text().splitlines()
            timed = [json.loads(x) | ({"wall_time_s": 60.0 if depth == 20 else 600.0}
                                      if json.loads(x)["split"] == "train" else {})
                     for x in lines]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in timed))
    report.write_report(tmp_path, analysis=False)
    md = (tmp_path / "report" / "table6.md").read_text()
    setup = md.split("## Setup")[1].split("## Table 6")[0]
    assert ("- Data: cifar10 from the class folders in `cifar10-jpeg.tar.gz`; 5,000 training "
            "images held out for validation (split seed 0)") in setup
    assert ("- Schedule: 10 steps of batch 128; SGD momentum 0.9, weight decay 0.0001; learning "
            "rate 0.1, x0.1 at steps 8,000 and 12,000 (after the last step: it never decays); no "
            "warm-up (ResNet-20); ") in setup
    assert "warm-up: 400 steps at 0.01 (ResNet-110)" in setup
    assert "- Model: cifar_resnet, option A shortcuts\n- Compute: float32, backend xla_gpu" in setup
    assert "- Hardware: 1 x NVIDIA H200; jax 0.10.2" in setup
    assert ("- Seeds: 0, 1, 2 (1/3 per net); packed with 2 other run(s) in one program "
            "(ResNet-20); one run per program (ResNet-110)") in setup
    # The three packed ResNet-20 runs share one 1-minute program: 1 + 10 minutes in all.
    assert "ResNet-20 1.0 min, ResNet-110 10.0 min; 11.0 min in all" in setup
    with open(tmp_path / "report" / "table6.csv") as f:
        rows = {int(r["depth"]): r for r in csv.DictReader(f)}
    assert float(rows[20]["wall_time_s_mean"]) == 60.0
