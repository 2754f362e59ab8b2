"""The heatmap behind `mp diff --plot`: relative change by layer (rows) and module (columns).

People scan a picture of where a fine-tune moved the weights faster than hundreds of lines.
Tensors outside the numbered layers (embeddings, final norm, head) get a row of their own.
matplotlib is an optional extra, imported only here.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any

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


# Formats matplotlib writes without extra software, as the file extension names them ('pgf' needs
# LaTeX; 'raw' and 'rgba' are pixel dumps, not image files).
_NOT_OFFERED = {"pgf", "raw", "rgba"}
DIR_FILE = "diff.png"


def _import_pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MpError("--plot needs matplotlib: pip install 'mpstore[plot]'") from None
    return plt


def formats() -> list[str]:
    """The image formats `--plot` writes, by file extension."""
    _import_pyplot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(set(FigureCanvasAgg.get_supported_filetypes()) - _NOT_OFFERED)


def plot_target(path: Path) -> tuple[Path, str]:
    """Where `--plot PATH` writes and in which format, checked before anything is computed.

    PATH's extension names the format (png, pdf, svg, ...); a PATH without one is a PNG at
    exactly PATH (never PATH.png); an existing folder gets DIR/diff.png. An unknown extension is
    an MpError naming the formats there are."""
    try:
        if path.is_dir():
            path = path / DIR_FILE
    except OSError:
        pass  # an unusable path: writing it fails with the system's reason
    ext = path.suffix.lower().removeprefix(".")
    if not ext:
        return path, "png"
    known = formats()
    if ext not in known:
        raise MpError(f"--plot {path}: unknown image format {'.' + ext!r}; "
                      f"use one of {', '.join('.' + f for f in known)}")
    return path, ext


def plot_diff(result: DiffResult, path: Path) -> Path:
    """Write the heatmap (see `plot_target` for where and in which format) and return its path;
    white cells are unchanged, grey cells have no tensor or no number (NaN/Inf, dtype change).
    The file appears whole or not at all: it is written under a temporary name first."""
    path, fmt = plot_target(path)
    plt = _import_pyplot()
    import numpy as np
    from matplotlib.colors import LogNorm

    rows, cols, cells = grid(result)
    data = np.array(cells, dtype=float).reshape(len(rows), len(cols))
    positive = data[np.isfinite(data) & (data > 0)]
    floor = float(positive.min()) if positive.size else 1e-6
    top = float(positive.max()) if positive.size else 1.0
    shown = np.ma.masked_invalid(np.where(data == 0, floor / 10, data))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cols) + 3), max(3, 0.3 * len(rows) + 2)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#cccccc", under="white")
    image = ax.imshow(shown, aspect="auto", cmap=cmap, norm=LogNorm(vmin=floor, vmax=max(top, floor * 1.0001)))
    ax.set_xticks(range(len(cols)), [_printable(c) for c in cols], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(f"relative change ||B-A||/||A||: {short(result.a, 8)} -> {short(result.b, 8)}", fontsize=9)
    fig.colorbar(image, ax=ax, extend="min", label="rel. L2 change")
    ax.set_xlabel("white: unchanged, grey: no such tensor or no number (NaN/Inf, dtype change)", fontsize=8)
    fig.tight_layout()
    stem = os.fsencode(path.name)[:100].decode(errors="ignore")  # the name fits, so does this
    tmp = path.parent / f".{stem}.mp-plot-{secrets.token_hex(4)}"
    try:
        fig.savefig(tmp, dpi=120, format=fmt)
        os.replace(tmp, path)
    except (OSError, ValueError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise WriteFailed(f"{path}: cannot write the plot: {reason}") from None
    finally:
        plt.close(fig)
    return path


def _printable(name: str) -> str:
    return name if name.isprintable() else repr(name)
