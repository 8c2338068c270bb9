"""JPEG decode variants for the streaming pipeline's crops, one thread, alternating windows.

For each generated photo-like JPEG (resnet_jax.bench.input_pipeline.photo_like, quality 90):

  train full    open_image (full decode) + random_resized_crop to 224 (the pre-draft path)
  train draft   decode_random_resized_crop: the same box, a JPEG decoded at 1/2, 1/4 or 1/8
                when the box keeps >= 224 px (what the library does now)
  eval full     open_image + resize 256 / centre crop 224
  eval draft    decode_resize_center_crop
  decode only   open_image alone
  + simplejpeg  (if importable; not a dependency) full decode to an array, then the same resize

Prints img/s per variant (median and range over windows) and paired ratios against the full
decode, measured in the same windows, and the mean absolute pixel difference of each variant's
output from the full decode's (0..255 scale), beside that of a bicubic resize of the full decode
(`--windows 0`: only these differences):

    python benchmarks/jpeg_decode.py --images 120 --windows 7 --sides 300,500
    python benchmarks/jpeg_decode.py --images 40 --windows 7 --sides 800,1600
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image

from resnet_jax.bench.input_pipeline import jpeg_bytes, photo_like
from resnet_jax.data import image_ops
from resnet_jax.data.folders import open_image

SIZE = 224


def variants(files: list[bytes], seeds: list[int]) -> dict:
    """name -> f(i) returning the uint8 output for file i (training crops seeded by seeds[i])."""
    def rng(i):
        return np.random.default_rng(seeds[i])

    out = {
        "train full": lambda i: image_ops.random_resized_crop(open_image(files[i], "x"), rng(i),
                                                              SIZE),
        "train draft": lambda i: image_ops.decode_random_resized_crop(files[i], "x", rng(i),
                                                                      SIZE),
        "eval full": lambda i: image_ops.resize_center_crop(open_image(files[i], "x"), SIZE),
        "eval draft": lambda i: image_ops.decode_resize_center_crop(files[i], "x", SIZE),
        "decode only": lambda i: open_image(files[i], "x"),
    }
    try:
        import simplejpeg
    except ImportError:
        return out

    def sj(i):
        return Image.fromarray(simplejpeg.decode_jpeg(files[i], colorspace="RGB"))

    out["train simplejpeg"] = lambda i: image_ops.random_resized_crop(sj(i), rng(i), SIZE)
    out["eval simplejpeg"] = lambda i: image_ops.resize_center_crop(sj(i), SIZE)
    out["decode only simplejpeg"] = lambda i: simplejpeg.decode_jpeg(files[i], colorspace="RGB")
    return out


def main() -> None:
    """Parses the flags, measures and prints."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--sides", default="300,500", help="min,max of each image's height and width")
    args = p.parse_args()
    lo, hi = (int(s) for s in args.sides.split(","))
    rng = np.random.default_rng(0)
    files = [jpeg_bytes(photo_like(rng, *(int(s) for s in rng.integers(lo, hi + 1, 2))))
             for _ in range(args.images)]
    seeds = list(range(args.images))
    fns = variants(files, seeds)
    n = len(files)
    print(f"{n} JPEGs, {lo}-{hi} px, mean {np.mean([len(f) for f in files]) / 1024:.0f} KB")
    factors = []
    for i, f in enumerate(files):
        w, h = Image.open(io.BytesIO(f)).size
        box = image_ops.random_resized_crop_box(w, h, np.random.default_rng(seeds[i]))
        factors.append((image_ops.draft_factor(box, SIZE),
                        image_ops.draft_factor(image_ops.center_crop_box(w, h, SIZE), SIZE)))
    for k, label in ((0, "train"), (1, "eval")):
        counts = {s: sum(f[k] == s for f in factors) for s in (1, 2, 4, 8)}
        print(f"{label} draft factors (images per factor): {counts}")
    for name in fns:
        if name.startswith("decode"):
            continue
        ref = fns["train full" if name.startswith("train") else "eval full"]
        diffs = [np.mean(np.abs(np.asarray(fns[name](i), np.int16) - ref(i))) for i in range(n)]
        print(f"{name:24s} mean abs diff from the full decode: mean {np.mean(diffs):.2f}, "
              f"max over images {np.max(diffs):.2f}")
    # For scale: two standard resamplings of one full decode differ by this much too.
    def bicubic(i):
        img = open_image(files[i], "x")
        box = image_ops.center_crop_box(img.width, img.height, SIZE)
        return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=box))

    diffs = [np.mean(np.abs(bicubic(i).astype(np.int16) - fns["eval full"](i)))
             for i in range(n)]
    print(f"{'eval bicubic (reference)':24s} mean abs diff from the full decode: mean "
          f"{np.mean(diffs):.2f}, max over images {np.max(diffs):.2f}")
    if args.windows < 1:
        return
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn(0)
    for _ in range(args.windows):
        for name, fn in fns.items():
            t = time.perf_counter()
            for i in range(n):
                fn(i)
            times[name].append(n / (time.perf_counter() - t))
    for name, rates in times.items():
        print(f"{name:24s} img/s {statistics.median(rates):7.0f} "
              f"[{min(rates):.0f}-{max(rates):.0f}]")
    for base, other in (("train full", "train draft"), ("eval full", "eval draft"),
                        ("train full", "train simplejpeg"), ("eval full", "eval simplejpeg"),
                        ("decode only", "decode only simplejpeg")):
        if other in times:
            ratios = [b / a for a, b in zip(times[base], times[other], strict=True)]
            print(f"{other} / {base}: paired median {statistics.median(ratios):.2f} "
                  f"[{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
