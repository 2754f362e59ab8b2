"""`mp`: a thin typer skin over `mpstore.Repo`. Parsing and printing only; no store logic here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import MpError
from .ids import short
from .repo import DEFAULT_CHUNK_SIZE, Repo, parse_size

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mpstore: a versioned model store for merging LLMs.")


class _State:
    repo_dir: str = "."
    quiet: bool = False


STATE = _State()


class _Bar:
    """A rich progress bar on a terminal; nothing otherwise or with --quiet."""

    def __init__(self) -> None:
        self._p = None

    def start(self, label: str, total: int) -> None:
        if STATE.quiet or not sys.stderr.isatty():
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        self._p = Progress("[bold]{task.description}", BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(), transient=True)
        self._p.start()
        self._task = self._p.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self._p:
            self._p.advance(self._task, n)

    def finish(self) -> None:
        if self._p:
            self._p.stop()
            self._p = None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _say(text: str) -> None:
    if not STATE.quiet:
        print(text)


def _open() -> Repo:
    return Repo.open(STATE.repo_dir)


def _emit_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


@app.callback()
def _global(
    repo_dir: Optional[str] = typer.Option(None, "-C", help="Run as if started in DIR (also MP_REPO).", metavar="DIR"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or chatter."),
) -> None:
    STATE.repo_dir = repo_dir or os.environ.get("MP_REPO") or "."
    STATE.quiet = quiet


@app.command()
def init(chunk_size: str = typer.Option(str(DEFAULT_CHUNK_SIZE), help="Chunk size in bytes (e.g. 1MiB).")) -> None:
    """Create a repository (./.mp) here."""
    with Repo.init(STATE.repo_dir, chunk_size=parse_size(chunk_size)) as repo:
        _say(f"initialised empty mpstore repository in {repo.root.absolute() / '.mp'}")


@app.command()
def add(
    path: Path = typer.Argument(..., help="A Hugging Face folder or a .safetensors file."),
    name: str = typer.Option(..., "--name", "-n", help="Branch to commit on."),
    base: Optional[str] = typer.Option(None, "--base", help="The model this one was fine-tuned from."),
    message: Optional[str] = typer.Option(None, "-m", "--message"),
) -> None:
    """Store a model as a new commit on branch NAME; prints the commit id."""
    with _open() as repo:
        res = repo.add(path, name, base=base, message=message, progress=_Bar())
    if not STATE.quiet:
        print(res.commit.hex())
        print(f"{_human(res.total_bytes)} added, {_human(res.new_bytes)} new", file=sys.stderr)
    else:
        print(res.commit.hex())


@app.command()
def checkout(
    ref: str,
    out: Path = typer.Option(..., "-o", "--output", help="Folder to write."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty folder."),
) -> None:
    """Rebuild a commit's model folder, byte-identical to what was added."""
    with _open() as repo:
        cid = repo.checkout(ref, out, force=force, progress=_Bar())
    _say(f"checked out {short(cid)} to {out}")


@app.command()
def log(ref: Optional[str] = typer.Argument(None), as_json: bool = typer.Option(False, "--json")) -> None:
    """Commits reachable from REF (default: the last branch written), newest first."""
    with _open() as repo:
        entries = repo.log(ref)
    if as_json:
        _emit_json([e.to_json() for e in entries])
        return
    for e in entries:
        c = e.commit
        extra = f"  (base {short(c.base)})" if c.base else ""
        print(f"{short(e.id)}  {c.time}  {c.author}  {c.message}{extra}")


@app.command()
def show(ref: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A commit: message, parents, size, parameters, dtypes, and how much was new."""
    with _open() as repo:
        info = repo.show(ref)
    if as_json:
        _emit_json(info)
        return
    print(f"commit    {info['id']}")
    print(f"parents   {' '.join(p[:12] for p in info['parents']) or '-'}")
    if info["base"]:
        print(f"base      {info['base'][:12]}")
    print(f"author    {info['author']}")
    print(f"time      {info['time']}")
    print(f"snapshot  {info['snapshot'][:12]}")
    print(f"size      {_human(info['size'])} ({info['size']} bytes) in {len(info['files'])} files")
    print(f"tensors   {info['tensors']}, {info['parameters']:,} parameters")
    for dtype, n in sorted(info["dtypes"].items()):
        print(f"  {dtype:<8} {n:,} parameters")
    pct = 100 * info["new_bytes"] / info["size"] if info["size"] else 0.0
    print(f"new       {_human(info['new_bytes'])} of it was new when added ({pct:.1f}%)")
    print()
    print(f"    {info['message']}")


@app.command("ls")
def ls_(ref: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """The tensors of a commit: name, dtype, shape, bytes."""
    with _open() as repo:
        rows = repo.ls(ref)
    if as_json:
        _emit_json(rows)
        return
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        print(f"{r['name']:<{width}}  {r['dtype']:<8} {shape:<16} {_human(r['bytes'])}")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


@app.command()
def diff(
    a: str,
    b: str,
    as_json: bool = typer.Option(False, "--json"),
    show_all: bool = typer.Option(False, "--all", help="Also list unchanged tensors."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a heatmap of relative change (PNG)."),
) -> None:
    """What changed from A to B, tensor by tensor."""
    with _open() as repo:
        result = repo.diff(a, b)
    if plot:
        from .plot import plot_diff

        plot_diff(result, plot)
    if as_json:
        _emit_json(result.to_json())
        return
    width = max((len(t.name) for t in result.tensors), default=0)
    for t in result.tensors:
        if t.status == "unchanged" and not show_all:
            continue
        line = f"{t.status:<9} {t.name:<{width}}"
        if t.status == "changed":
            line += (f"  chunks {t.changed_chunks}/{t.total_chunks}  rel_l2 {_fmt(t.rel_l2, '.3e')}"
                     f"  cos {_fmt(t.cosine, '.6f')}  max|d| {_fmt(t.max_abs, '.3e')}")
            if t.note:
                line += f"  ({t.note})"
        print(line)
    n = result.counts()
    print(f"{n['changed']} of {len(result.tensors)} tensors changed, {n['only_a']} only in A, "
          f"{n['only_b']} only in B; {_human(result.bytes_changed())} changed")


@app.command()
def branch(as_json: bool = typer.Option(False, "--json")) -> None:
    """List branches with their head commit."""
    with _open() as repo:
        heads = repo.branches()
        current = repo.head()
        rows = [(name, cid, repo.describe(cid)) for name, cid in sorted(heads.items())]
    if as_json:
        _emit_json([{"name": n, "id": c.hex(), "head": n == current} for n, c, _ in rows])
        return
    for name, _, desc in rows:
        print(f"{'*' if name == current else ' '} {name:<20} {desc}")


def main() -> None:
    """Entry point: user errors become one line on stderr; exit 1 for bad input, 2 for bad usage."""
    try:
        code = app(standalone_mode=False)
    except MpError as e:
        print(f"mp: error: {e}", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as e:  # click's usage errors, in one line instead of a box
        ctx = getattr(e, "ctx", None)
        hint = f" (see: mp {ctx.info_name} --help)" if ctx is not None and ctx.parent else " (see: mp --help)"
        print(f"mp: error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
