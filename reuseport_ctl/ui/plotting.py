"""matplotlib for the --plot options: the Agg backend (no display), one
sentence when it is missing or the file cannot be written."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib).") from None
    return plt


def save(fig, path: str | Path) -> Path:
    """Write fig as a PNG at path and close it."""
    import matplotlib.pyplot as plt
    path = Path(path)
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as e:
        raise UserError(f"cannot write the plot to {path}: {e.strerror}.") from None
    finally:
        plt.close(fig)
    return path
