"""Scoring a state on a whole split: every example counted, the last batch padded and masked."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.sharding import Mesh

from resnet_jax.data import NormStats, eval_batches, shard_batch


def evaluate_split(eval_step: Callable, state, images: np.ndarray, labels: np.ndarray,
                   stats: NormStats, batch_size: int, mesh: Mesh,
                   return_logits: bool = False) -> dict:
    """Loss, top-1 and top-5 error (%) over all `len(images)` examples of a split.

    With `return_logits`, also the logits of every example (float32 [N, classes], in order).
    """
    batches = (shard_batch(b, mesh) for b in eval_batches(images, labels, batch_size))
    return evaluate_batches(eval_step, state, batches, stats, len(images), return_logits)


def evaluate_batches(eval_step: Callable, state, batches: Iterable[tuple], stats: NormStats,
                     expected: int, return_logits: bool = False) -> dict:
    """`evaluate_split` over global `(images, labels, mask)` device arrays that cover a split of
    `expected` examples once (the padding masked); raises if the count differs."""
    totals = {"loss_sum": 0.0, "wrong1": 0.0, "wrong5": 0.0, "count": 0.0}
    all_logits = []
    for x, y, mask in batches:
        out = eval_step(state, x, y, mask, stats)
        for k in totals:
            totals[k] += float(out[k])
        if return_logits:
            logits = np.asarray(jax.device_get(out["logits"]))
            all_logits.append(logits[np.asarray(jax.device_get(mask))])
    n = totals["count"]
    if n != expected:
        raise RuntimeError(f"evaluation counted {n} examples, expected {expected}")
    result = {
        "loss": totals["loss_sum"] / max(n, 1),
        "error": 100.0 * totals["wrong1"] / max(n, 1),
        "top5_error": 100.0 * totals["wrong5"] / max(n, 1),
        "count": n,
    }
    if return_logits:
        result["logits"] = np.concatenate(all_logits) if all_logits else np.zeros((0,))
    return result
