"""The heatmap behind `mp diff --plot`: relative change by layer (rows) and module (columns).

People scan a picture of where a fine-tune moved the weights faster than hundreds of lines.
Tensors outside the numbered layers (embeddings, final norm, head) get a row of their own.
matplotlib is an optional extra, imported only here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import MpError, WriteFailed
from ..store.ids import short
from .diff import DiffResult

_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")
OTHER_ROW = "non-layer"


def grid(result: DiffResult) -> tuple[list[str], list[str], list[list[float]]]:
    """Rows, columns and cells (NaN where no tensor) of relative L2 change."""
    cells: dict[tuple[str, str], float] = {}
    layers: set[int] = set()
    modules: list[str] = []
    others: list[str] = []
    for t in result.tensors:
        if t.status != "changed" and t.status != "unchanged":
            continue
        value = t.rel_l2 if t.rel_l2 is not None else math.nan
        m = _LAYER.match(t.name)
        if m:
            layer, module = int(m.group(1)), m.group(2)
            layers.add(layer)
            if module not in modules:
                modules.append(module)
            cells[(str(layer), module)] = value
        else:
            others.append(t.name)
            cells[(OTHER_ROW, t.name)] = value
    rows = [OTHER_ROW] * bool(others) + [str(i) for i in sorted(layers)]
    cols = sorted(modules) + others
    return rows, cols, [[cells.get((r, c), math.nan) for c in cols] for r in rows]


def plot_diff(result: DiffResult, path: Path) -> None:
    """Write the heatmap as a PNG: white cells are unchanged, grey cells have no tensor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib.colors import LogNorm
    except ImportError:
        raise MpError("--plot needs matplotlib: pip install 'mpstore[plot]'") from None
    rows, cols, cells = grid(result)
    data = np.array(cells, dtype=float).reshape(len(rows), len(cols))
    positive = data[np.isfinite(data) & (data > 0)]
    floor = float(positive.min()) if positive.size else 1e-6
    top = float(positive.max()) if positive.size else 1.0
    shown = np.ma.masked_invalid(np.where(data == 0, floor / 10, data))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cols) + 3), max(3, 0.3 * len(rows) + 2)))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#cccccc")
    cmap.set_under("white")
    image = ax.imshow(shown, aspect="auto", cmap=cmap, norm=LogNorm(vmin=floor, vmax=max(top, floor * 1.0001)))
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(f"relative change ||B-A||/||A||: {short(result.a, 8)} -> {short(result.b, 8)}", fontsize=9)
    fig.colorbar(image, ax=ax, extend="min", label="rel. L2 change")
    ax.set_xlabel("white: unchanged, grey: no such tensor", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise WriteFailed(f"{path}: cannot write the plot: {e.strerror or e}") from None
    finally:
        plt.close(fig)
