"""The one exception family for problems a user can cause.

Everything a person can get wrong (a bad path, a malformed file, an unknown ref) raises an
`MpError` subclass whose message names the problem in one line; the CLI prints it and exits
non-zero. Anything else escaping is a bug in mpstore, not the user's input.
"""


def quoted(value: object) -> str:
    """A value a user gave, as it goes into a one-line message: its repr, cut short."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deep; an int of more digits than repr allows
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


class MpError(Exception):
    """Base of all user-facing errors; `str(err)` is the one line the CLI prints."""


class NotARepository(MpError):
    """No store where one was expected."""


class RepositoryExists(MpError):
    """`init` over an existing store."""


class FormatMismatch(MpError):
    """The store was written by an incompatible format version."""


class BadInput(MpError):
    """A model folder or safetensors file that cannot be ingested as it is."""


class UnknownRef(MpError):
    """A name or id that resolves to nothing."""


class AmbiguousRef(MpError):
    """An id prefix that matches several commits."""


class BadRefName(MpError):
    """A branch or tag name that would be unsafe or unparseable."""


class CorruptData(MpError):
    """Stored bytes that no longer hash to their key."""


class TargetExists(MpError):
    """A checkout target that already holds files (or holds the repository)."""


class WriteFailed(MpError):
    """The operating system refused to write where the user asked."""


class BadMerge(MpError):
    """A merge request that cannot be carried out as asked."""


class StoreBusy(MpError):
    """An operation that needs the repository to itself found another process using it."""


class DiskFull(MpError):
    """The device holding the store (or a checkout) has no space left; nothing was committed."""


class ReadOnlyStore(MpError):
    """A writing command on a store that cannot be written (a read-only mount)."""


class StoreDamaged(MpError):
    """The store's data file itself is damaged (truncated, overwritten pages)."""


class RemoteError(MpError):
    """A remote that cannot be reached, read or written as asked (URL, bucket, credentials)."""


class Rejected(MpError):
    """A push or pull that would lose commits (not a fast-forward) or lost a race for a ref."""
