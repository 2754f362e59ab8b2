"""mpstore: a versioned model store with git-like semantics, built for merging LLMs.

The public API: `Repo` (every verb), `MergeRequest` (what to merge, from flags or MergeKit YAML),
`Plan` (a merge as stored: enough to run it again bit for bit) and `MpError` (the one family of
errors a user can cause). Importing it never imports torch: the merge engine is loaded by the
verbs that compute on tensors.
"""

from .errors import MpError
from .merge.request import MergeRequest
from .repo import Repo
from .store.objects import Plan

__all__ = ["MergeRequest", "MpError", "Plan", "Repo"]
