"""Images per second per seed: R seeds packed in one program against one seed alone.

Times the library's own train block (`resnet_jax.train.loop.jit_train_block`, packed or not) on
random CIFAR-shaped data resident on the device, after a warm-up call (compile excluded):

    python benchmarks/pack_speed.py --depths 20,56,110 --runs 3 --steps-per-call 100 --calls 3

Rows: `single` (`model.backend` "auto": oneDNN on a one-device CPU run, plain on GPU/TPU),
`single-xla` (the backend a pack uses: xla_cpu instead of oneDNN) and `packed` (R seeds). The
last column is total img/s over the `single` row's: for `packed`, how much faster R seeds train
packed than one after another.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    """Parses the flags, times each configuration and prints one table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="20", help="comma-separated CIFAR ResNet depths")
    p.add_argument("--family", default="cifar_resnet", help="cifar_resnet or cifar_plain")
    p.add_argument("--runs", type=int, default=3, help="seeds in the pack")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps-per-call", type=int, default=1)
    p.add_argument("--calls", type=int, default=3, help="timed calls after the warm-up call")
    p.add_argument("--devices", type=int, default=1, help="devices of the mesh (default 1)")
    args = p.parse_args()

    from resnet_jax.backends.xla_flags import backend_initialized, configure_cpu

    if not backend_initialized():
        configure_cpu()
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from resnet_jax.config import default_config
    from resnet_jax.data import Dataset, DataSpec, compute_stats, replicate
    from resnet_jax.train import create_state, graphdefs, make_mesh, make_optimizer, make_schedule
    from resnet_jax.train.loop import jit_train_block
    from resnet_jax.train.packed import make_stacker, packed_config

    mesh = make_mesh(jax.devices()[: args.devices])
    repl = NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    n = 10 * args.batch_size
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.int32)
    spec = DataSpec("random", "random", 10, (32, 32, 3), tuple(map(str, range(10))), n, 0, 0)
    ds = Dataset(images, labels, images[:0], labels[:0], images[:0], labels[:0], spec,
                 compute_stats(images, "mean_image"))
    data = replicate((ds.train_images, ds.train_labels, ds.stats), mesh)
    print(f"backend {jax.default_backend()}, {mesh.size} device(s), batch {args.batch_size}, "
          f"{args.steps_per_call} steps per call, {args.calls} timed calls, "
          f"{args.runs} runs packed")
    print(f"{'net':>12} {'mode':>10} {'ms/call':>9} {'img/s total':>12} {'img/s/seed':>11} "
          f"{'vs single':>18}")
    for depth in [int(d) for d in args.depths.split(",")]:
        config = default_config()
        config.model.family, config.model.depth = args.family, depth
        config.train.batch_size = args.batch_size
        t = config.train
        tx = make_optimizer(config.optim, t.batch_size, t.num_steps)
        schedule = make_schedule(config.optim, t.batch_size, t.num_steps)
        results = {}
        modes = [("single", config, False), ("single-xla", packed_config(config), False),
                 ("packed", packed_config(config), True)]
        for mode, cfg, packed in modes:
            train_def, _ = graphdefs(cfg, spec)
            block = jit_train_block(cfg, train_def, tx, schedule, mesh, args.steps_per_call,
                                    packed=packed)
            seeds = range(args.runs) if packed else range(1)
            states = []
            for s in seeds:
                c = cfg.copy_and_resolve_references()
                c.train.seed = s
                states.append(create_state(c, spec, tx, repl))
            state = make_stacker(repl)(states) if packed else states[0]
            state, _ = block(state, data)
            jax.block_until_ready(state)
            start = time.perf_counter()
            for _ in range(args.calls):
                state, _ = block(state, data)
            jax.block_until_ready(state)
            dt = (time.perf_counter() - start) / args.calls
            imgs = args.batch_size * args.steps_per_call * len(seeds)
            results[mode] = total = imgs / dt
            # Seeds one after another at the single run's speed take R/that; packed, R/total.
            print(f"{args.family[6:]}{depth:>6} {mode:>10} {dt * 1e3:9.1f} {total:12.0f} "
                  f"{total / len(seeds):11.0f} {total / results['single']:17.2f}x", flush=True)


if __name__ == "__main__":
    main()
