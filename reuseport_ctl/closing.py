"""The one context-manager shape of the tool's owners of kernel objects
(probes, selectors' groups, exporters, watches): `with X(...) as x:` closes
x at the end of the block, whatever happens in it."""
from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound="Closing")


class Closing:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
