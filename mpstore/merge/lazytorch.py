"""torch for the merge engine, imported where it is first used rather than with the modules.

A merge whose blocks all run in the fused kernels (methods/kernels.py: the task-arithmetic family
in float32 over bfloat16 or float32 inputs) never touches torch, and importing it was 1 s of such
a merge's 3-4 s. Modules write `from ..lazytorch import torch` and use it as the module.

Every thread that runs torch work inside `single_threaded()` (a merge) does it with one intra-op
thread, so sums do not depend on the machine's cores: a thread is set up when a job starts
(`configure_thread`, for tensors it is handed) and whenever it reaches torch through `torch`."""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

_local = threading.local()  # .generation: the single_threaded() this thread was set up for
_generation = 0  # the current single_threaded() (0: none)
_lock = threading.Lock()


def configure_thread() -> None:
    """One intra-op thread for torch work in this thread, inside single_threaded() once torch
    is loaded (nothing to do before: the first use sets it up)."""
    if _generation and getattr(_local, "generation", 0) != _generation:
        module = sys.modules.get("torch")
        if module is not None and hasattr(module, "set_num_threads"):
            _local.generation = _generation
            module.set_num_threads(1)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Torch work on every thread runs single-threaded inside; the calling thread's setting is
    restored afterwards (torch's own default if it was loaded inside)."""
    global _generation
    loaded = sys.modules.get("torch")
    before = loaded.get_num_threads() if loaded is not None else None
    with _lock:
        _generation += 1
    configure_thread()
    try:
        yield
    finally:
        with _lock:
            _generation = 0
        module = sys.modules.get("torch")
        if module is not None:
            module.set_num_threads(before if before is not None else _default_threads)


_default_threads = 1  # torch's intra-op threads as it came up (set by _Lazy._load)


class _Lazy:
    """The torch module, imported at the first attribute read."""

    def __getattr__(self, name: str) -> Any:
        module = sys.modules.get("torch")
        if module is None or not hasattr(module, "__version__"):
            module = self._load()
        configure_thread()
        return getattr(module, name)

    @staticmethod
    def _load() -> Any:
        global _default_threads
        module = importlib.import_module("torch")
        _default_threads = module.get_num_threads()
        return module


if TYPE_CHECKING:
    import torch as torch
else:
    torch = _Lazy()
