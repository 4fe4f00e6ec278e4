"""The one picture-grid helper: `advpipe inspect --grid` and `advpipe sample --grid` both draw with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

Cell = tuple[np.ndarray, str | None]  # a (C, H, W) float image in [0, 1] and its title


def image_grid(rows: list[list[Cell]], out: str | Path, *, row_labels: list[str] | None = None,
               cell_size: tuple[float, float] = (1.3, 1.3), title_size: int = 7) -> Path:
    """Draw rows of images into a PNG at `out` (grey images in grey, no axes); returns the path.

    Uses a bare matplotlib Figure, not pyplot, so no global backend or figure state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max(len(row) for row in rows)
    figure = Figure(figsize=(cell_size[0] * columns, cell_size[1] * len(rows)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c >= len(row):
                axis.axis("off")
                continue
            image, title = row[c]
            picture = np.asarray(image).transpose(1, 2, 0)
            axis.imshow(picture[..., 0] if picture.shape[2] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            if title:
                axis.set_title(title, fontsize=title_size)
        if row_labels:
            axes[r][0].set_ylabel(row_labels[r], fontsize=title_size)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out
