"""How long operations report progress without knowing who is watching.

Plumbing calls a `Progress`; the CLI passes one that draws a bar on a terminal, tests and the
Python API get the silent default. This keeps rich (porcelain) out of the store's modules.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


class Silent:
    """The default: report nothing."""

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass
