"""mpstore: a versioned model store with git-like semantics, built for merging LLMs."""

from .errors import MpError
from .repo import Repo

__all__ = ["MpError", "Repo"]
