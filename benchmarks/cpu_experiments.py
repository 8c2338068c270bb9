"""XLA CPU flag experiments: alternate subprocesses with different XLA_FLAGS, paired ratios.

Flags are read once when jax starts its backend, so each configuration runs in its own process;
configurations alternate round-robin so machine noise hits them equally. Used to fill the
"attempts" table of docs/performance.md:

    python benchmarks/cpu_experiments.py --model resnet20 --rounds 3 \
        --config base: --config ynn:--xla_cpu_experimental_ynn_fusion_type=-individual_convolution
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKER = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from resnet_jax.bench.step import build_state, make_train_step, make_mesh
cfg = json.loads(sys.argv[1])
mesh = make_mesh(cfg["devices"]) if cfg["devices"] > 1 else None
dtype = jnp.bfloat16 if cfg["dtype"] == "bfloat16" else jnp.float32
st = build_state(cfg["model"], dtype=dtype, scan_blocks=cfg["scan"], remat=cfg["remat"], mesh=mesh)
step = make_train_step(st, mesh=mesh)
bs = cfg["batch"]
x = jnp.asarray(np.random.RandomState(0).randn(bs, 32, 32, 3), jnp.float32)
y = jnp.asarray(np.random.RandomState(1).randint(0, 10, bs), jnp.int32)
if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec as P
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
t = time.perf_counter()
comp = step.lower(st.params, st.batch_stats, st.opt_state, x, y).compile()
ct = time.perf_counter() - t
p, s, o = st.params, st.batch_stats, st.opt_state
for _ in range(2):
    p, s, o, loss = comp(p, s, o, x, y)
loss.block_until_ready()
ts = []
for _ in range(cfg["windows"]):
    t = time.perf_counter()
    for _ in range(cfg["steps"]):
        p, s, o, loss = comp(p, s, o, x, y)
    loss.block_until_ready()
    ts.append((time.perf_counter() - t) / cfg["steps"])
print("RESULT " + json.dumps({"compile_s": ct, "step_s": ts, "loss": float(loss)}))
"""


def run_one(flags: str, cfg: dict, extra_env: dict[str, str]) -> dict:
    """Runs the worker once with XLA_FLAGS=`flags`; returns its parsed result."""
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra_env)
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(cfg)], env=env,
                         capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(out.stderr[-3000:])


def main() -> None:
    """Parses configs NAME:FLAGS[:devices[:dtype]] and alternates them for `--rounds` rounds."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-scan", action="store_true")
    ap.add_argument("--config", action="append", required=True,
                    help="name|XLA flags|devices|dtype|ENV=V,ENV=V")
    a = ap.parse_args()
    configs = []
    for c in a.config:
        parts = c.split("|")
        parts += ["", "", "1", "float32", ""][len(parts):]
        env = dict(kv.split("=", 1) for kv in parts[4].split(",") if kv)
        configs.append((parts[0], parts[1], int(parts[2] or 1), parts[3] or "float32", env))
    results: dict[str, list[float]] = {c[0]: [] for c in configs}
    compile_s: dict[str, list[float]] = {c[0]: [] for c in configs}
    for r in range(a.rounds):
        for name, flags, dev, dtype, env in configs:
            if dev > 1:
                flags = f"{flags} --xla_force_host_platform_device_count={dev}".strip()
            cfg = dict(model=a.model, batch=a.batch, devices=dev, dtype=dtype,
                       scan=not a.no_scan, remat=False, windows=a.windows, steps=a.steps)
            t = time.time()
            res = run_one(flags, cfg, env)
            ips = a.batch / statistics.median(res["step_s"])
            results[name].append(ips)
            compile_s[name].append(res["compile_s"])
            print(f"round {r} {name:>14}: {ips:7.1f} img/s  compile {res['compile_s']:.1f}s "
                  f"loss {res['loss']:.4f} ({time.time() - t:.0f}s)", flush=True)
    base = configs[0][0]
    print(f"\nmodel {a.model} batch {a.batch}; ratio vs {base} paired per round")
    for name, *_ in configs:
        ratios = [x / b for x, b in zip(results[name], results[base], strict=True)]
        print(f"{name:>14}: median {statistics.median(results[name]):7.1f} img/s "
              f"[{min(results[name]):.1f}-{max(results[name]):.1f}]  ratio "
              f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]  "
              f"compile {statistics.median(compile_s[name]):.1f}s")


if __name__ == "__main__":
    main()
