"""`mp`: a thin typer skin over `mpstore.Repo`. Parsing and printing only; no store logic here."""

from __future__ import annotations

import atexit
import errno
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    import rich.progress

    from .merge.catalog import AnalyzeResult
    from .remote.sync import Moved

from .errors import CorruptData, MpError
from .merge.request import MergeRequest, dtype_name, parse_value, split_per_model, stages
from .model.checkout import too_long
from .repo import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESS, Repo
from .store.ids import short
from .units import parse_size

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mpstore: a versioned model store for merging LLMs.")


class _State:
    repo_dir: str = "."
    quiet: bool = False


STATE = _State()


class _Bar:
    """A rich progress bar on a terminal; nothing otherwise or with --quiet."""

    def __init__(self) -> None:
        self._p: rich.progress.Progress | None = None
        self._task: rich.progress.TaskID | None = None

    def start(self, label: str, total: int) -> None:
        if STATE.quiet or not sys.stderr.isatty():
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        self._p = Progress("[bold]{task.description}", BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(), transient=True)
        self._p.start()
        self._task = self._p.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self._p and self._task is not None:
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


def _clean(text: str) -> str:
    """`text` as a terminal may show it: a name or message holding control or other unprintable
    characters (an ANSI escape, a newline) is shown escaped, repr-style, so it can neither drive
    the terminal nor forge lines. JSON output keeps every name exact."""
    return text if text.isprintable() else repr(text)


def _open() -> Repo:
    return Repo.open(STATE.repo_dir)


def _emit_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


@app.callback()
def _global(
    repo_dir: str | None = typer.Option(None, "-C", help="Run as if started in DIR (also MP_REPO).", metavar="DIR"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or chatter."),
) -> None:
    STATE.repo_dir = repo_dir or os.environ.get("MP_REPO") or "."
    STATE.quiet = quiet
    problem = too_long(Path(STATE.repo_dir).absolute())
    if problem:  # every command, init included, would trip on it
        raise MpError(f"{'-C' if repo_dir else 'MP_REPO'} {_clean(STATE.repo_dir)}: {problem}")


@app.command()
def init(chunk_size: str = typer.Option(str(DEFAULT_CHUNK_SIZE), help="Chunk size in bytes (e.g. 1MiB)."),
         compress: str = typer.Option(DEFAULT_COMPRESS, help="How chunks are stored: none (raw), planes (each "
                                      "compressed alone) or delta (also as a delta against the base's)."),
         ) -> None:
    """Create a repository (./.mp) here."""
    with Repo.init(STATE.repo_dir, chunk_size=parse_size(chunk_size), compress=compress) as repo:
        _say(f"initialised empty mpstore repository in {repo.root.absolute() / '.mp'}")


@app.command()
def add(
    path: str = typer.Argument(..., help="A Hugging Face folder, a .safetensors file, or hf://ORG/NAME[@REVISION] "
                                         "from the Hugging Face cache (offline with HF_HUB_OFFLINE=1)."),
    name: str = typer.Option(..., "--name", "-n", help="Branch to commit on."),
    base: str | None = typer.Option(None, "--base", help="The model this one was fine-tuned from."),
    message: str | None = typer.Option(None, "-m", "--message"),
) -> None:
    """Store a model as a new commit on branch NAME; prints the commit id."""
    with _open() as repo:
        res = repo.add(path, name, base=base, message=message, progress=_Bar())
    print(res.commit.hex())
    if not STATE.quiet:
        print(f"{_human(res.total_bytes)} added, {_human(res.new_bytes)} new", file=sys.stderr)
        if res.analyzed is not None:
            _say_analyzed(res.analyzed)


def _say_analyzed(a: AnalyzeResult) -> None:
    print(f"catalog: {a.pairs} chunks differ from the base, {a.measured} newly measured "
          f"in {a.seconds:.2f} s", file=sys.stderr)


@app.command()
def analyze(
    ref: str,
    base: str = typer.Option(..., "--base", help="The model REF was fine-tuned from."),
    threads: int | None = typer.Option(None, help="Worker threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Record the delta catalog of REF against BASE (what `add --base` does), for budgeted merges."""
    with _open() as repo:
        res = repo.analyze(ref, base, threads=threads, progress=_Bar())
    if as_json:
        _emit_json(res.to_json())
        return
    print(f"{res.pairs} chunks differ from the base; {res.measured} measured "
          f"({_human(res.bytes_read)} read) in {res.seconds:.2f} s")


@app.command()
def checkout(
    ref: str,
    out: Path = typer.Option(..., "-o", "--output", help="Folder to write."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty folder."),
) -> None:
    """Rebuild a commit's model folder, byte-identical to what was added."""
    with _open() as repo:
        cid = repo.checkout(ref, out, force=force, progress=_Bar())
    _say(f"checked out {short(cid)} to {_clean(str(out))}")


def _draw(node: dict, prefix: str = "", last: bool = True, top: bool = True) -> None:
    label = f"{node['id'][:12]}  {_clean(node['message'])}"
    if node.get("method"):
        label += f"  [{node['method']}]"
    if node.get("seen"):
        label += "  (shown above)"
    print(label if top else f"{prefix}{'└── ' if last else '├── '}{label}")
    child_prefix = "" if top else prefix + ("    " if last else "│   ")
    for i, parent in enumerate(node["parents"]):
        _draw(parent, child_prefix, i == len(node["parents"]) - 1, False)


@app.command()
def log(
    ref: str | None = typer.Argument(None),
    as_json: bool = typer.Option(False, "--json"),
    graph: bool = typer.Option(False, "--graph", help="Draw the lineage: merges with their inputs."),
) -> None:
    """Commits reachable from REF (default: the last branch written), newest first."""
    with _open() as repo:
        if graph:
            tree = repo.lineage(ref)
        else:
            entries = repo.log(ref)
    if graph:
        if as_json:
            _emit_json(tree.to_json())
        else:
            _draw(tree.to_json())
        return
    if as_json:
        _emit_json([e.to_json() for e in entries])
        return
    for e in entries:
        c = e.commit
        extra = f"  (base {short(c.base)})" if c.base else ""
        print(f"{short(e.id)}  {c.time}  {_clean(c.author)}  {_clean(c.message)}{extra}")


@app.command()
def show(ref: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A commit: message, parents, size, parameters, dtypes, and how much was new."""
    with _open() as repo:
        info = repo.show(ref).to_json()
    if as_json:
        _emit_json(info)
        return
    print(f"commit    {info['id']}")
    print(f"parents   {' '.join(p[:12] for p in info['parents']) or '-'}")
    if info["base"]:
        print(f"base      {info['base'][:12]}")
    if info.get("source"):
        print(f"source    hf://{info['source']['hf']}@{info['source']['revision'][:12]}")
    print(f"author    {_clean(info['author'])}")
    print(f"time      {info['time']}")
    print(f"snapshot  {info['snapshot'][:12]}")
    print(f"size      {_human(info['size'])} ({info['size']} bytes) in {len(info['files'])} files")
    print(f"tensors   {info['tensors']}, {info['parameters']:,} parameters")
    for dtype, n in sorted(info["dtypes"].items()):
        print(f"  {dtype:<8} {n:,} parameters")
    pct = 100 * info["new_bytes"] / info["size"] if info["size"] else 0.0
    print(f"new       {_human(info['new_bytes'])} of it was new when added ({pct:.1f}%)")
    _say_space("stored   ", info["space"])
    plan = info["plan"]
    if plan:
        print(f"plan      {info['plan_id'][:12]}: {plan['method']}, seed {plan['seed']}, "
              f"compute {plan['compute_dtype'] or 'input dtype'}, out {plan['out_dtype'] or 'compute dtype'}, "
              f"engine {plan['engine']}")
        adapters = plan.get("adapters") or [None] * (1 + len(plan["models"]))
        if plan["base"]:
            print(f"  base    {plan['base'][:12]}{_adapter(adapters[0])}")
        for m, q, a in zip(plan["models"], plan["model_params"] or [{}] * len(plan["models"]), adapters[1:]):
            shown = ", ".join(f"{k}={v[0]}" for k, v in q.items() if v)
            print(f"  input   {m[:12]}{_adapter(a)}  {_clean(shown)}")
        shown = ", ".join(f"{k}={v[0]}" for k, v in plan["global_params"].items() if v)
        if shown:
            print(f"  global  {_clean(shown)}")
        for k, sl in enumerate(plan.get("slices") or []):
            sources = ", ".join(f"{plan['models'][i][:8]}[{a}:{b}]" for i, a, b in sl["sources"])
            shown = ", ".join(f"{k}={v[0]}" for k, v in sl["global_params"].items() if v)
            print(f"  slice {k:<2} {sources}  {_clean(shown)}")
        if plan.get("tokenizer"):
            t = plan["tokenizer"]
            print(f"  tokens  from {_clean(str(t['source']))[:12]}, {len(t['tokens'])} configured"
                  f"{', padded to a multiple of ' + str(t['pad_to_multiple_of']) if t['pad_to_multiple_of'] else ''}")
        if plan.get("chat_template"):
            template = plan["chat_template"]
            print(f"  chat    {'auto' if template == 'auto' else f'a template of {len(template)} characters'}")
        if plan.get("budget"):
            b = plan["budget"]
            print(f"  budget  {b['spec']} = {_human(b['bytes'])} of expert reads ({b['select']})")
    if info.get("stats"):
        _print_io((plan or {}).get("estimate") or {}, info["stats"])
    print()
    print(f"    {_clean(info['message'])}")


@app.command("ls")
def ls_(ref: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """The tensors of a commit: name, dtype, shape, bytes."""
    with _open() as repo:
        rows = [row.to_json() for row in repo.ls(ref)]
    if as_json:
        _emit_json(rows)
        return
    names = [_clean(r["name"]) for r in rows]
    width = max(map(len, names), default=0)
    for name, r in zip(names, rows):
        shape = "x".join(map(str, r["shape"])) or "scalar"
        print(f"{name:<{width}}  {r['dtype']:<8} {shape:<16} {_human(r['bytes'])}")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


@app.command()
def diff(
    a: str,
    b: str,
    as_json: bool = typer.Option(False, "--json"),
    show_all: bool = typer.Option(False, "--all", help="Also list unchanged tensors."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write a heatmap of relative change: PNG, or the format the extension names "
                             "(.pdf, .svg, ...); a folder gets DIR/diff.png."),
) -> None:
    """What changed from A to B, tensor by tensor (NaN and Inf counted, never hidden)."""
    if plot:
        from .model.plot import plot_target

        plot_target(plot)  # an unknown format is refused before any work
    with _open() as repo:
        result = repo.diff(a, b)
    if plot:
        from .model.plot import plot_diff

        written = plot_diff(result, plot)
        if written != plot:
            print(f"heatmap written to {_clean(str(written))}", file=sys.stderr)
    if as_json:
        _emit_json(result.to_json())
        return
    names = {t.name: _clean(t.name) for t in result.tensors}
    width = max(map(len, names.values()), default=0)
    for t in result.tensors:
        if t.status == "unchanged" and not show_all:
            continue
        line = f"{t.status:<9} {names[t.name]:<{width}}"
        if t.status == "changed":
            line += (f"  chunks {t.changed_chunks}/{t.total_chunks}  rel_l2 {_fmt(t.rel_l2, '.3e')}"
                     f"  cos {_fmt(t.cosine, '.6f')}  max|d| {_fmt(t.max_abs, '.3e')}")
            if t.note:
                line += f"  ({t.note})"
            if t.nonfinite:
                c = t.nonfinite
                line += "  non-finite: " + "; ".join(
                    f"{side} {c['nan_' + key]} NaN, {c['inf_' + key]} Inf"
                    for side, key in (("A", "a"), ("B", "b"), ("diff", "diff")))
        print(line)
    n = result.counts()
    bad = result.nonfinite()
    print(f"{n['changed']} of {len(result.tensors)} tensors changed, {n['only_a']} only in A, "
          f"{n['only_b']} only in B; {_human(result.bytes_changed())} changed"
          + (f"; {bad} with NaN/Inf" if bad else ""))


def _change_ref(repo: Repo, kind: str, name: str | None, ref: str | None, delete: bool) -> bool:
    """The create (NAME [REF]) and delete (-d NAME) forms shared by `mp branch` and `mp tag`;
    False when neither was asked for (then the command lists)."""
    create, remove = (repo.create_branch, repo.delete_branch) if kind == "branch" else (repo.tag, repo.delete_tag)
    if delete:
        if name is None or ref is not None:
            raise MpError(f"usage: mp {kind} -d NAME")
        _say(f"deleted {kind} {name} (was {short(remove(name))})")
        return True
    if name is None:
        return False
    if ref is None:
        ref = repo.current_branch()
        if ref is None:
            raise MpError("no commit to point at: give a REF")
    _say(f"{kind} {name} -> {_clean(repo.describe(create(name, ref)))}")
    return True


@app.command()
def branch(
    name: str | None = typer.Argument(None, help="Branch to create (or delete with -d)."),
    ref: str | None = typer.Argument(None, help="Where it points (default: the last branch written)."),
    delete: bool = typer.Option(False, "-d", "--delete", help="Delete branch NAME."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List branches; `mp branch NAME [REF]` creates one; `mp branch -d NAME` deletes one."""
    with _open() as repo:
        if _change_ref(repo, "branch", name, ref, delete):
            return
        rows = repo.branch_rows()
    if as_json:
        _emit_json([r.to_json() for r in rows])
        return
    for r in rows:
        print(f"{'*' if r.current else ' '} {r.name:<20} {short(r.id)} {_clean(r.message)}")


@app.command()
def tag(
    name: str | None = typer.Argument(None, help="Tag to create (or delete with -d)."),
    ref: str | None = typer.Argument(None, help="What it names (default: the last branch written)."),
    delete: bool = typer.Option(False, "-d", "--delete", help="Delete tag NAME."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List tags; `mp tag NAME [REF]` creates one (tags never move); `mp tag -d NAME` deletes."""
    with _open() as repo:
        if _change_ref(repo, "tag", name, ref, delete):
            return
        rows = repo.tag_rows()
    if as_json:
        _emit_json([r.to_json() for r in rows])
        return
    for r in rows:
        print(f"  {r.name:<20} {short(r.id)} {_clean(r.message)}")


@app.command()
def reset(branch: str, ref: str) -> None:
    """Move BRANCH to REF (the old head stays in the reflog)."""
    with _open() as repo:
        cid = repo.reset(branch, ref)
        _say(f"{branch} -> {_clean(repo.describe(cid))}")


@app.command()
def reflog(branch: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every move of a branch, newest first: old and new commit, time, command."""
    with _open() as repo:
        log = repo.reflog(branch)
    if as_json:
        _emit_json(log.to_json())
        return
    if not log.entries and log.head is not None:
        print(f"{branch}  at {short(log.head)}: no recorded moves (its reflog expired in gc)")
    for n, e in enumerate(reversed(log.entries)):
        old = short(e.old) if e.old else "(new)"
        new = short(e.new) if e.new else "(deleted)"
        print(f"{branch}@{{{n}}}  {old} -> {new}  {e.time}  {_clean(e.command)}")


@app.command()
def fsck(as_json: bool = typer.Option(False, "--json")) -> None:
    """Check every object, ref and chunk; each problem on its own line; exit 1 if any."""
    with _open() as repo:
        res = repo.fsck(isolate=True)
    if as_json:
        _emit_json(res.to_json())
    else:
        for p in res.problems:
            print(_clean(p))
        if not STATE.quiet:  # the problems are flushed first: on one terminal the summary follows them
            sys.stdout.flush()
            print(f"checked {res.refs} refs, {res.objects} objects, {res.chunks} chunks "
                  f"({_human(res.chunk_bytes)}), {res.catalog} catalog entries: {len(res.problems)} problems"
                  + (f"; {res.not_fetched} chunks not fetched yet (a lazy clone)" if res.not_fetched else ""),
                  file=sys.stderr)
    if not res.ok:
        raise typer.Exit(1)


@app.command()
def gc(
    expire: str = typer.Option("30d", help="Keep what reflog entries younger than this name (e.g. 30d, now)."),
    compact: bool = typer.Option(False, "--compact", help="Also rewrite the data file to return space to the disk."),
    recompress: str | None = typer.Option(None, "--recompress", metavar="POLICY",
                                          help="Store every chunk again as none, planes or delta (as mp init "
                                               "--compress); new chunks follow it too."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Delete objects and chunks that no ref, tag or live reflog entry reaches."""
    with _open() as repo:
        freed = repo.gc(expire, compact, recompress, progress=_Bar()).to_json()
    if as_json:
        _emit_json(freed)
        return
    print(f"freed {freed['objects']} objects, {freed['chunks']} chunks ({_human(freed['chunk_bytes'])}), "
          f"{freed['reflog_entries']} expired reflog entries, {freed['catalog_entries']} catalog entries, "
          f"{freed['file_cache_entries']} file-cache entries")
    if recompress is not None:
        r = freed["recompressed"]
        print(f"recompressed ({recompress}): {r['chunks']} chunks stored again, chunks take "
              f"{_human(r['stored_bytes_before'])} -> {_human(r['stored_bytes_after'])}")
    if compact:
        print(f"data file: {_human(freed['file_bytes_before'])} -> {_human(freed['file_bytes_after'])}")


@app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Branches and tags, store size, chunks and objects, and what gc could reclaim."""
    with _open() as repo:
        st = repo.status()
    if as_json:
        _emit_json(st.to_json())
        return
    for r in st.branches:
        print(f"{'*' if r.current else ' '} {r.name:<20} {short(r.id)} {_clean(r.message)}")
    for r in st.tags:
        print(f"  tags/{r.name:<15} {short(r.id)} {_clean(r.message)}")
    e, g = st.entries, st.reclaimable
    print(f"store: {_human(st.store_bytes)} on disk ({_human(st.used_bytes)} in use), "
          f"{e['chunks']} chunks, {e['objects']} objects, chunk size {_human(st.chunk_size)}")
    print(f"reclaimable by gc: {_human(g.chunk_bytes)} in {g.chunks} chunks and {g.objects} objects")
    _say_space(f"chunks ({st.compress}):", st.space.to_json())


def _say_space(label: str, space: dict) -> None:
    """Logical against stored bytes, in all and per codec."""
    ratio = "-" if space["ratio"] is None else f"{space['ratio']:.3f}"
    print(f"{label} {_human(space['logical_bytes'])} of chunks in {_human(space['stored_bytes'])} (ratio {ratio})")
    for codec, c in space["codecs"].items():
        r = "-" if c["ratio"] is None else f"{c['ratio']:.3f}"
        print(f"  {codec:<8} {c['chunks']} chunks, {_human(c['logical_bytes'])} in {_human(c['stored_bytes'])} "
              f"(ratio {r})")


_MODEL_OPTIONS = ("weight", "density", "gamma", "epsilon")


def merge(
    ctx: typer.Context,
    models: list[str] = typer.Argument(None, help="Refs of the models to merge (not the base)."),
    method: str | None = typer.Option(None, "--method", help="linear, task_arithmetic, ties, dare_ties, ..."),
    base: str | None = typer.Option(None, "--base", help="The base model's ref."),
    config: Path | None = typer.Option(None, "--config", help="A MergeKit YAML file (models are refs)."),
    branch: str | None = typer.Option(None, "-b", "--branch", help="Branch to commit the merge on (merge)."),
    message: str | None = typer.Option(None, "-m", "--message"),
    weight: str | None = typer.Option(None, help="One value, or one per model: 0.5,0.3,0.2"),
    density: str | None = typer.Option(None, help="One value, or one per model."),
    gamma: str | None = typer.Option(None, help="breadcrumbs: fraction removed from the top."),
    epsilon: str | None = typer.Option(None, help="della: half-width of the keep probabilities."),
    lambda_: float | None = typer.Option(None, "--lambda", help="Scale of the merged delta."),
    t: str | None = typer.Option(None, "--t", help="slerp: 0 = base, 1 = the other model (or a gradient)."),
    normalize: bool | None = typer.Option(None, "--normalize/--no-normalize"),
    rescale: bool | None = typer.Option(None, "--rescale/--no-rescale"),
    param: list[str] = typer.Option([], "--param", help="Any other parameter: NAME=VALUE (JSON values)."),
    seed: int = typer.Option(0, help="Seed of the random methods (dare_*, della*)."),
    dtype: str | None = typer.Option(None, help="Compute dtype (default float32; YAML: as MergeKit)."),
    out_dtype: str | None = typer.Option(None, help="Output dtype (default: the compute dtype)."),
    compute_dtype: str | None = typer.Option(
        None, "--compute-dtype", help="Compute at this precision (float32, float64) instead of the dtype "
                                      "the YAML or --dtype names, which then names the output."),
    budget: str | None = typer.Option(
        None, "--budget", help="Bound on expert bytes read: '10%' of the bytes that differ from the base, or '2GB'."),
    select: str = typer.Option("greedy", "--select", help="How a budget picks chunks: greedy or random."),
    threads: int | None = typer.Option(None, help="Worker threads (default: all cores)."),
    memory_limit: str = typer.Option("1GB", help="Bound on the memory of blocks in flight."),
    as_json: bool = typer.Option(False, "--json", help="plan: print the plan as JSON."),
) -> None:
    """Merge models with a MergeKit method and commit the result with its plan."""
    from .merge.request import check_request, check_threads, parse_budget  # light: no torch

    planning = ctx.info_name == "plan"
    check_threads(threads)
    if budget is not None:
        parse_budget(budget)  # refused here, before torch starts; the planner parses it again
    try:
        memory = parse_size(memory_limit)
    except MpError as e:
        raise MpError(f"--memory-limit: {e}") from None
    if memory < 1:
        raise MpError("--memory-limit: the bound on blocks in flight must be at least 1 byte")
    _open().close()  # outside a repository, say so before planning anything
    requests = []
    if config is not None:
        if method or base or models:
            raise MpError("--config carries the method, base and models: give none of them on the command line")
        requests = stages(config)
        if planning and len(requests) > 1:
            raise MpError(f"{config}: `mp plan` takes a one-stage config (this one has {len(requests)} stages)")
        request = requests[-1]
    else:
        if not method or not models:
            raise MpError("give --method and the models to merge (or --config FILE)")
        per_model: list[dict[str, object]] = [{} for _ in models]
        for name, value in zip(_MODEL_OPTIONS, (weight, density, gamma, epsilon)):
            if value is not None:
                for q, v in zip(per_model, split_per_model(value, len(models), name)):
                    q[name] = v
        global_params: dict = {}
        for name, flag in (("lambda", lambda_), ("normalize", normalize), ("rescale", rescale)):
            if flag is not None:
                global_params[name] = flag
        if t is not None:
            global_params["t"] = parse_value(t)
        for item in param:
            name, sep, value = item.partition("=")
            if not sep:
                raise MpError(f"--param {item!r}: expected NAME=VALUE")
            global_params[name] = parse_value(value)
        request = MergeRequest(method, base, list(models), per_model, global_params,
                               dtype_name(dtype or "float32", "dtype"), dtype_name(out_dtype, "out_dtype"))
    for req in requests or [request]:
        req.seed = seed
        req.compute_dtype = dtype_name(compute_dtype, "compute dtype")
        check_request(req)  # every value usable before torch is imported and anything is read
    if not planning and branch is None and request.name is None:
        raise MpError("merge needs -b BRANCH: the branch to commit the merge on")
    if len(requests) > 1:
        if budget is not None or message is not None:
            raise MpError("--budget and -m apply to a one-stage config (this one has "
                          f"{len(requests)} stages)")
        with _open() as repo:
            done = repo.merge_stages(requests, branch, threads=threads, memory_limit=memory, progress=_Bar())
        for req, res in zip(requests, done):
            print(f"{res.commit.hex()} {_clean(str(req.name if res is not done[-1] else branch or req.name))}")
        return
    branch = branch or request.name
    with _open() as repo:
        if planning:
            plan = repo.plan(request, budget=budget, select=select, memory_limit=memory)
            network = repo.network_bytes(plan, memory)
            _print_plan(plan.to_json() | ({} if network is None else {"network_bytes": network}), as_json)
            return
        assert branch is not None  # checked above: only `mp plan` goes without
        res = repo.merge(request, branch, message=message, threads=threads,
                         memory_limit=memory, progress=_Bar(), budget=budget, select=select)
    print(res.commit.hex())
    st = res.realized
    if not STATE.quiet:
        print(f"read {_human(st['expert_bytes'])} of experts and {_human(st['base_bytes'])} of base; "
              f"{st['chunks_skipped']} expert chunks skipped, {st['chunks_omitted']} left out by the budget",
              file=sys.stderr)


app.command("merge")(merge)
app.command("plan", help="Print the plan `mp merge` would run with the same arguments: reads, "
                         "bytes by source, error bound, time; executes nothing.")(merge)


def _print_io(est: dict, st: dict) -> None:
    """What the planner predicted beside what the merge did."""
    print(f"{'':<10}{'estimated':>14}{'realized':>14}")
    for label, key in (("experts", "expert_bytes"), ("base", "base_bytes"), ("all reads", "read_bytes"),
                       ("output", "output_bytes")):
        shown = [_human(d[key]) if key in d else "-" for d in (est, st)]
        print(f"{label:<10}{shown[0]:>14}{shown[1]:>14}")
    print(f"{'left out':<10}{est.get('chunks_omitted', '-'):>14}{st.get('chunks_omitted', '-'):>14}  chunks")
    sec = st.get("seconds") or {}
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in sec.items())
    print(f"{'time':<10}{(str(est['seconds']) + ' s') if 'seconds' in est else '-':>14}  {phases or '-'}")
    if est:
        bound = "none" if est["bound"] is None else f"{est['bound']:.6g}"
        print(f"bound     {bound}: covers {est['bound_covers']}")
    print(f"skipped   {st['chunks_skipped']} expert chunks equal to the base, "
          f"{st['tensors_copied']} tensors unchanged")


def _ratio(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def _adapter(commit: str | None) -> str:
    return f"+{commit[:8]}" if commit else ""


def _print_plan(p: dict, as_json: bool) -> None:
    if as_json:
        _emit_json(p)
        return
    e = p["estimate"]
    print(f"plan      {p['method']} of {len(p['models'])} models, base {(p['base'] or '-')[:12]}")
    if p.get("budget"):
        b = p["budget"]
        print(f"budget    {b['spec']} = {_human(b['bytes'])} of expert reads ({b['select']})")
    print("tensor                                              expert bytes read / differing")
    for name, (read, differing) in e["tensors"].items():
        print(f"  {_clean(name):<50} {_human(read):>10} / {_human(differing):<10} {_ratio(read, differing):>6}")
    print(f"experts   {_human(e['expert_bytes'])} of {_human(e['expert_total'])} that differ from the base "
          f"({_ratio(e['expert_bytes'], e['expert_total'])}); {e['chunks_omitted']} chunks left out")
    print(f"base      {_human(e['base_bytes'])} read")
    print(f"reads     {_human(e['read_bytes'])} in all (passes that read a block again included)")
    print(f"output    {_human(e['output_bytes'])} computed")
    bound = "none" if e["bound"] is None else f"{e['bound']:.6g} (L2 over all tensors)"
    print(f"bound     {bound}; covers {e['bound_covers']}")
    print(f"time      ~{e['seconds']:.1f} s")
    if "network_bytes" in p:
        print(f"network   {_human(p['network_bytes'])} to download (a lazy clone: chunks it reads that are not here)")


@app.command()
def replay(ref: str, threads: int | None = typer.Option(None)) -> None:
    """Re-execute a merge's stored plan; prints "identical" or the tensors that differ."""
    with _open() as repo:
        res = repo.replay(ref, threads=threads, progress=_Bar())
    for r in [*res.chain, res]:
        if r.identical:
            print(f"identical {short(r.commit)}" if res.chain else "identical")
            continue
        older = f" (its plan was recorded by merge engine {r.engine}, not this one)" if r.engine else ""
        print(f"differs from {short(r.commit)} in {len(r.differing)} tensors/files{older}:")
        for name in r.differing:
            print(f"  {_clean(name)}")
    if not res.all_identical:
        raise typer.Exit(1)


@app.command()
def revert(
    ref: str,
    branch: str | None = typer.Option(None, "-b", "--branch", help="Branch to revert on (default: HEAD's)."),
    force: bool = typer.Option(False, "--force", help="Take the parent's version even where changed since."),
    message: str | None = typer.Option(None, "-m", "--message"),
) -> None:
    """Undo one commit's changes on a branch, tensor by tensor, as a new commit."""
    with _open() as repo:
        rid = repo.revert(ref, branch=branch, force=force, message=message)
    print(rid.hex())


remote_app = typer.Typer(help="Name remotes: other repositories (a path) or object stores (s3://BUCKET/PREFIX).")
app.add_typer(remote_app, name="remote")


@remote_app.callback(invoke_without_command=True)
def remote_list(ctx: typer.Context, verbose: bool = typer.Option(False, "-v", "--verbose", help="With URLs."),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """List remotes (names; with -v, their URLs)."""
    if ctx.invoked_subcommand is not None:
        return
    with _open() as repo:
        remotes = repo.remotes()
    if as_json:
        _emit_json(remotes)
        return
    for name, url in sorted(remotes.items()):
        print(f"{_clean(name)}\t{_clean(url)}" if verbose else _clean(name))


@remote_app.command("add")
def remote_add(name: str, url: str) -> None:
    """Name the remote at URL (credentials come from the AWS environment, never the store)."""
    with _open() as repo:
        kept = repo.remote_add(name, url)
    _say(f"remote {_clean(name)} -> {_clean(kept)}")


@remote_app.command("remove")
def remote_remove(name: str) -> None:
    """Forget a remote and its remote-tracking branches."""
    with _open() as repo:
        repo.remote_remove(name)


def _say_moved(verb: str, where: str, m: Moved) -> None:
    if STATE.quiet:
        return
    print(f"{verb} {m.objects} objects, {m.chunks} chunks ({_human(m.chunk_bytes)}), {m.catalog} catalog entries "
          f"{'to' if verb == 'sent' else 'from'} {_clean(where)}: {_human(m.wire_bytes)} on the wire", file=sys.stderr)
    for name, old, new in m.refs:
        print(f"  {_clean(name)}: {short(old) if old else '(new)'} -> {short(new)}", file=sys.stderr)
    for name in m.up_to_date:
        print(f"  {_clean(name)}: up to date", file=sys.stderr)
    for why in m.skipped:
        print(f"  skipped {_clean(why)}", file=sys.stderr)


@app.command()
def clone(url: str, directory: str,
          lazy: bool = typer.Option(False, "--lazy", help="Refs and objects only: chunks are fetched when read."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Copy a remote repository into DIRECTORY, with the remote named origin."""
    repo, moved = Repo.clone(url, directory, lazy=lazy)
    with repo:
        branch = repo.current_branch()
    if as_json:
        _emit_json({"directory": directory, "branch": branch, "fetched": moved.to_json()})
        return
    _say_moved("received", url, moved)
    _say(f"cloned into {_clean(directory)}" + (f", on branch {_clean(branch)}" if branch else "")
         + (" (lazy: chunks are fetched when read)" if lazy else ""))


@app.command()
def fetch(remote: str = typer.Argument("origin"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Bring a remote's branches (as REMOTE/BRANCH) and tags, and what they reach."""
    with _open() as repo:
        moved = repo.fetch(remote)
    if as_json:
        _emit_json(moved.to_json())
    else:
        _say_moved("received", remote, moved)


@app.command()
def pull(remote: str = typer.Argument("origin"), branch: str | None = typer.Argument(None),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Fetch, then fast-forward BRANCH (default: the current one) to REMOTE/BRANCH."""
    with _open() as repo:
        res = repo.pull(remote, branch)
    if as_json:
        _emit_json(res.to_json())
        return
    _say_moved("received", remote, res.fetched)
    if res.old == res.new:
        _say(f"{_clean(res.branch)} is up to date with {_clean(remote)}/{_clean(res.branch)}")
    else:
        _say(f"{_clean(res.branch)}: {short(res.old) if res.old else '(new)'} -> {short(res.new)} (fast-forward)")


@app.command()
def push(remote: str = typer.Argument("origin"),
         refs: list[str] = typer.Argument(None, help="Branches or tags (default: the current branch)."),
         force: bool = typer.Option(False, "--force", "-f", help="Move the remote's refs even if that loses commits."),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Send branches and tags, and what they reach that the remote lacks."""
    with _open() as repo:
        moved = repo.push(remote, refs or None, force)
    if as_json:
        _emit_json(moved.to_json())
    else:
        _say_moved("sent", remote, moved)


def main() -> None:
    """Entry point: user errors become one line on stderr; exit 1 for bad input, 2 for bad usage."""
    try:
        code = app(standalone_mode=False)
    except CorruptData as e:
        print(f"mp: error: {e} (`mp fsck` lists everything that is damaged)", file=sys.stderr)
        _end(1)
    except MpError as e:
        print(f"mp: error: {e}", file=sys.stderr)
        _end(1)
    except typer.TyperException as e:  # click's usage errors, in one line instead of a box
        ctx = getattr(e, "ctx", None)
        hint = f" (see: mp {ctx.info_name} --help)" if ctx is not None and ctx.parent else " (see: mp --help)"
        print(f"mp: error: {e.format_message()}{hint}", file=sys.stderr)
        _end(getattr(e, "exit_code", 2))
    except typer.Abort:
        _end(130)
    except BrokenPipeError:
        _end(1)
    except OSError as e:  # the system refused something plumbing did not expect to fail
        where = f": {e.filename}" if e.filename else ""
        reason = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        print(f"mp: error: {reason}{where}", file=sys.stderr)
        _end(1)
    _end(code if isinstance(code, int) else 0)


def _end(code: int) -> NoReturn:
    """Exit without tearing the interpreter down. Every command has committed its transactions
    and closed its files when it returns, and unloading torch, numba and LLVM module by module
    took 0.5 s of a merge's wall time (docs/benchmarks.md). atexit handlers still run and output
    is flushed first."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, OSError):  # a reader that went away: the exit says so
            code = code or 1
    os._exit(code)
