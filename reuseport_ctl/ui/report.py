"""What the experiments' reports (churn, reload) draw alike: their tables'
style and a count cell that stands out when it is a failure."""
from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text


def report_table(title: str, caption: str | None = None) -> Table:
    return Table(title=title, caption=caption, title_justify="left", caption_justify="left",
                 box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def served_by(row: dict) -> str:
    """An exact case's row: how many of the queued each worker served."""
    return ", ".join(f"w{w}: {n}" for w, n in row["served_by"].items()) or "-"


def count(v, bad: bool = True) -> Text:
    """A count (or a rate): bold red when it is a failure (bad) and not 0,
    dim when 0, "-" when there is none (None)."""
    if v is None:
        return Text("-", style="dim")
    text = f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"
    return Text(text, style="bold red" if v and bad else "dim" if not v else "")
