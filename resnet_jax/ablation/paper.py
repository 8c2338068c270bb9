"""THE table of He et al. 2015's CIFAR-10 numbers that the report compares with (one place only).

Copied from the paper's Table 6 and the text of section 4.2 (see
shared/reference/he2015-cifar10.md); nothing else in the code base may restate these values.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of Table 6: a residual net's depth, parameter count and CIFAR-10 test error."""

    depth: int
    params_m: float  # millions, as printed in the paper
    error: float  # %, the figure in the table (ResNet-110: best of 5 runs)
    mean: float | None = None  # mean over runs, where the paper gives it
    std: float | None = None
    runs: int | None = None


# Table 6, residual nets (option A shortcuts), test error (%) on CIFAR-10.
TABLE6: dict[int, PaperRow] = {
    20: PaperRow(20, 0.27, 8.75),
    32: PaperRow(32, 0.46, 7.51),
    44: PaperRow(44, 0.66, 7.17),
    56: PaperRow(56, 0.85, 6.97),
    110: PaperRow(110, 1.7, 6.43, mean=6.61, std=0.16, runs=5),
    1202: PaperRow(1202, 19.4, 7.93),
}

# Plain nets have no row in Table 6; Figure 6 (left) and the text state only these facts.
PLAIN_OBSERVATIONS: tuple[str, ...] = (
    "Plain nets of depth 20, 32, 44, 56: deeper plain nets have higher training error and "
    "higher test error (the degradation problem).",
    "Plain-110 has error above 60% and is not shown in Figure 6.",
    "Residual nets: deeper is better up to 110 layers; ResNet-1202 has similar training error "
    "but worse test error than ResNet-110 (overfitting).",
)
PLAIN110_ERROR_ABOVE = 60.0  # %, "the 110-layer plain net has error higher than 60%"


def paper_row(kind: str, depth: int) -> PaperRow | None:
    """The paper's Table 6 row of a residual net of `depth`; None for plain nets, other depths."""
    return TABLE6.get(depth) if kind == "residual" else None
