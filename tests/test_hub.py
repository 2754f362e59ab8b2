"""Models from the Hugging Face cache: `mp add hf://ORG/NAME[@REVISION]` and cache snapshot folders.

Each test builds the cache layout huggingface_hub writes (refs/NAME holding a commit hash,
snapshots/<commit>/ of relative symlinks into ../../blobs/, blobs named by hash) and runs the real
`mp` with HF_HUB_OFFLINE=1 and HF_ENDPOINT on a closed local port: nothing can download. Resolution
runs in `mp` subprocesses, because huggingface_hub reads its environment when it is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_user_error, run_mp, store_fingerprint, tree_bytes

from mpstore import Repo
from mpstore.store.objects import Commit, decode

MAIN = "0123456789abcdef" * 2 + "01234567"  # the commit refs/main names
DEV = "fedcba9876543210" * 2 + "76543210"  # the commit refs/dev names


def cache_repo(hub: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """`hub/models--ORG--NAME` as huggingface_hub lays it out: each model folder of `snapshots`
    (commit → folder) as links to content-named blobs (a file shared by two snapshots is one
    blob), and `refs` (name → commit)."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for name, commit in refs.items():
        (repo / "refs" / name).write_text(commit)  # no newline, as huggingface_hub writes it
    for commit, model in snapshots.items():
        for rel, data in tree_bytes(model).items():
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    return repo


@pytest.fixture(scope="module")
def models(tmp_path_factory, family) -> dict[str, Path]:
    """Two revisions of one model, with a nested file (its link climbs one level more)."""
    out = {}
    for name in ("base", "expert-1"):
        folder = tmp_path_factory.mktemp("hf-models") / name
        shutil.copytree(family[name], folder)
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.json").write_text(f'{{"{name}": 1}}')
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory, models) -> Path:
    """An HF cache holding org/tiny at two commits: refs/main → base, refs/dev → expert-1."""
    root = tmp_path_factory.mktemp("hf-cache")
    cache_repo(root, "org/tiny", {MAIN: models["base"], DEV: models["expert-1"]}, {"main": MAIN, "dev": DEV})
    return root


@pytest.fixture(autouse=True)
def offline(hub, monkeypatch, tmp_path):
    """Every `mp` these tests run resolves from `hub` alone and cannot reach any network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port, should offline mode fail


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "repo"
    Repo.init(root, chunk_size=4096).close()
    return root


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    return proc.stdout


def add(store: Path, source: str | Path, branch: str) -> dict:
    """`mp add SOURCE -n BRANCH`, then the commit as `mp show --json` gives it."""
    ok(run_mp("-C", store, "add", source, "-n", branch))
    return json.loads(ok(run_mp("-C", store, "show", branch, "--json")))


def checked_out(store: Path, ref: str, out: Path) -> dict[str, bytes]:
    ok(run_mp("-C", store, "checkout", ref, "-o", out))
    assert not any(p.is_symlink() for p in out.rglob("*"))  # the bytes were stored, not the links
    return tree_bytes(out)


def test_hf_reference_resolves_offline_and_checks_out_the_blobs_byte_for_byte(store, tmp_path, hub, models):
    info = add(store, "hf://org/tiny", "tiny")
    assert info["source"] == {"hf": "org/tiny", "revision": MAIN}
    assert info["message"] == "add hf://org/tiny"
    blobs = {p.name: p.read_bytes() for p in (hub / "models--org--tiny" / "blobs").iterdir()}
    got = checked_out(store, "tiny", tmp_path / "out")
    assert got == tree_bytes(models["base"])
    assert all(blobs[hashlib.sha256(data).hexdigest()] == data for data in got.values())
    log = json.loads(ok(run_mp("-C", store, "log", "tiny", "--json")))
    assert log[0]["source"] == {"hf": "org/tiny", "revision": MAIN}
    ok(run_mp("-C", store, "fsck"))  # exits 1 on any problem


@pytest.mark.parametrize("revision,commit,model", [
    ("main", MAIN, "base"), ("dev", DEV, "expert-1"), (DEV, DEV, "expert-1"),
], ids=["ref-main", "ref-dev", "commit-hash"])
def test_a_revision_resolves_by_ref_name_or_commit_hash(store, tmp_path, models, revision, commit, model):
    info = add(store, f"hf://org/tiny@{revision}", "t")
    assert info["source"] == {"hf": "org/tiny", "revision": commit}
    assert checked_out(store, "t", tmp_path / "out") == tree_bytes(models[model])


def test_the_snapshot_folder_itself_gives_the_same_snapshot_and_provenance(store, hub):
    by_reference = add(store, "hf://org/tiny@dev", "ref")
    by_path = add(store, hub / "models--org--tiny" / "snapshots" / DEV, "path")
    assert by_path["snapshot"] == by_reference["snapshot"]
    assert by_path["source"] == by_reference["source"] == {"hf": "org/tiny", "revision": DEV}
    assert by_path["new_bytes"] == 0  # every chunk was already there


def test_a_plain_folder_records_no_source_and_never_imports_huggingface_hub(store, models):
    script = ("import sys; from mpstore import Repo\n"
              f"with Repo.open({str(store)!r}) as r: r.add({str(models['base'])!r}, 'plain')\n"
              "assert 'huggingface_hub' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(ok(run_mp("-C", store, "show", "plain", "--json")))["source"] is None


def test_commits_without_a_source_keep_their_encoding():
    plain = Commit(b"s" * 16, (), "m", "a", "2026-01-01T00:00:00Z")
    assert b"source" not in plain.encoded  # so ids of commits made before the field stay
    sourced = Commit(b"s" * 16, (), "m", "a", "2026-01-01T00:00:00Z", source={"hf": "o/n", "revision": MAIN})
    assert sourced.id != plain.id
    assert decode(sourced.encoded) == sourced and decode(plain.encoded) == plain


def _into_refs(repo: Path, snap: Path) -> None:
    os.symlink("../../refs/main", snap / "evil.txt")  # in the cache repository, but not a blob


def _into_the_cache_repo_root(repo: Path, snap: Path) -> None:
    (repo / "stray.txt").write_text("not a blob")
    os.symlink("../../stray.txt", snap / "evil.txt")


def _into_a_folder_named_like_blobs(repo: Path, snap: Path) -> None:
    (repo / "blobs-old").mkdir()
    (repo / "blobs-old" / "x").write_text("not a blob")
    os.symlink("../../blobs-old/x", snap / "evil.txt")


def _into_another_cache_repo(repo: Path, snap: Path) -> None:
    other = repo.parent / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "x").write_text("another model's blob")
    os.symlink("../../../models--org--other/blobs/x", snap / "evil.txt")


@pytest.mark.parametrize("escape", [_into_refs, _into_the_cache_repo_root, _into_a_folder_named_like_blobs,
                                    _into_another_cache_repo], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("by", ["reference", "path"])
def test_links_anywhere_but_the_same_cache_repos_blobs_are_refused(store, tmp_path, monkeypatch, models, escape, by):
    hub = tmp_path / "own-cache"
    repo = cache_repo(hub, "org/tiny", {MAIN: models["base"]}, {"main": MAIN})
    escape(repo, repo / "snapshots" / MAIN)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    before = store_fingerprint(store)
    source = "hf://org/tiny" if by == "reference" else repo / "snapshots" / MAIN
    assert_user_error(run_mp("-C", store, "add", source, "-n", "bad"), "evil.txt", "symlink points outside")
    assert store_fingerprint(store) == before


@pytest.mark.parametrize("spec,fragments", [
    ("hf://org/missing", ["not in the Hugging Face cache", "HF_HUB_OFFLINE=1", "models--org--missing"]),
    ("hf://org/tiny@v9", ["unknown revision 'v9'", "HF_HUB_OFFLINE=1", "refs dev, main"]),
    ("hf://org/tiny@" + "9" * 40, ["unknown revision", "2 snapshot(s)"]),
    ("hf://", ["not a Hugging Face model reference"]),
    ("hf://org/tiny/extra", ["not a Hugging Face model reference"]),
    ("hf://org--x/tiny", ["not a Hugging Face model reference"]),
    ("hf://org/tiny@", ["not a revision after '@'"]),
    ("hf://org/tiny@../../refs/main", ["not a revision after '@'"]),
], ids=["missing-repo", "unknown-ref", "unknown-commit", "empty", "three-parts", "double-dash", "empty-revision",
        "climbing-revision"])
def test_bad_references_are_one_line_and_leave_the_store_as_it_was(store, hub, spec, fragments):
    before = store_fingerprint(store)
    line = assert_user_error(run_mp("-C", store, "add", spec, "-n", "bad"), spec, *fragments)
    if "models--org--missing" in fragments:
        assert str(hub) in line  # the cache path searched
    assert store_fingerprint(store) == before
