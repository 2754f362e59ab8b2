"""The README's tour through the real `mp` command: init, add, branch, log, show, ls, diff,
checkout, with -C / MP_REPO from elsewhere and --json outputs that parse."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import run_mp, tree_bytes
from safetensors import safe_open

from mpstore import Repo

HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def tour(tmp_path_factory, family):
    """`mp init`, `mp add base`, then each expert with --base, as the README shows them."""
    root = tmp_path_factory.mktemp("tour")
    outputs = {"init": run_mp("init", cwd=root)}
    ids = {}
    for name, path in family.items():
        extra = [] if name == "base" else ["--base", "base"]
        proc = run_mp("add", path, "--name", name, "-m", f"{name} model", *extra, cwd=root)
        outputs[name] = proc
        ids[name] = proc.stdout.strip()
    return root, ids, outputs


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    return proc.stdout


def test_init_and_add_report_what_they_did(tour, family):
    root, ids, outputs = tour
    assert ok(outputs["init"]).strip() == f"initialised empty mpstore repository in {root / '.mp'}"
    for name, proc in outputs.items():
        if name == "init":
            continue
        assert HEX32.fullmatch(ok(proc).strip()), proc.stdout  # stdout is the commit id alone
        catalog = "" if name == "base" else r"catalog: \d+ chunks differ from the base, \d+ newly measured in [\d.]+ s\n"
        assert re.fullmatch(r"[\d.]+ (B|KiB|MiB) added, [\d.]+ (B|KiB|MiB) new\n" + catalog, proc.stderr)
    with Repo.open(root) as repo:
        assert {n: c.hex() for n, c in repo.branches().items()} == ids


def test_branch(tour):
    root, ids, _ = tour
    doc = json.loads(ok(run_mp("branch", "--json", cwd=root)))
    assert doc == [{"name": n, "id": ids[n], "head": n == "expert-3"} for n in sorted(ids)]
    lines = ok(run_mp("branch", cwd=root)).splitlines()
    assert len(lines) == 4
    assert lines[-1].startswith("* expert-3") and ids["expert-3"][:12] in lines[-1]
    assert lines[0].startswith("  base") and "base model" in lines[0]


def test_log(tour):
    root, ids, _ = tour
    doc = json.loads(ok(run_mp("log", "expert-2", "--json", cwd=root)))
    assert [e["id"] for e in doc] == [ids["expert-2"]]
    (entry,) = doc
    assert entry["base"] == ids["base"] and entry["parents"] == []
    assert entry["message"] == "expert-2 model" and entry["author"] == "tester"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["time"])
    text = ok(run_mp("log", "expert-2", cwd=root))
    assert text.startswith(ids["expert-2"][:12]) and f"(base {ids['base'][:12]})" in text
    # no ref: the branch written last
    assert json.loads(ok(run_mp("log", "--json", cwd=root)))[0]["id"] == ids["expert-3"]


def test_show(tour, family):
    root, ids, _ = tour
    info = json.loads(ok(run_mp("show", "expert-1", "--json", cwd=root)))
    files = tree_bytes(family["expert-1"])
    with safe_open(str(family["expert-1"] / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    params = sum(math.prod(s) for s in shapes.values())
    assert info["id"] == ids["expert-1"] and info["base"] == ids["base"]
    assert info["size"] == sum(len(b) for b in files.values())
    assert info["files"] == sorted(files)
    assert info["tensors"] == len(shapes)
    assert info["parameters"] == params and info["dtypes"] == {"BF16": params}
    assert info["tensor_bytes"] == 2 * params
    text = ok(run_mp("show", ids["expert-1"][:8], cwd=root))
    assert f"commit    {ids['expert-1']}" in text
    assert f"{params:,} parameters" in text
    assert f"base      {ids['base'][:12]}" in text


def test_ls(tour, family):
    root, ids, _ = tour
    rows = json.loads(ok(run_mp("ls", "base", "--json", cwd=root)))
    raw = (family["base"] / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__")
    in_file_order = sorted(header, key=lambda n: header[n]["data_offsets"])
    assert [r["name"] for r in rows] == in_file_order
    for r in rows:
        h = header[r["name"]]
        assert (r["dtype"], r["shape"], r["bytes"], r["file"]) == (
            h["dtype"], h["shape"], h["data_offsets"][1] - h["data_offsets"][0], "model.safetensors")
    text = ok(run_mp("ls", "base", cwd=root)).splitlines()
    assert len(text) == len(rows)
    first = header[in_file_order[0]]
    assert text[0].split()[:3] == [in_file_order[0], "BF16", "x".join(map(str, first["shape"]))]


def test_diff_summary(tour):
    root, _, _ = tour
    doc = json.loads(ok(run_mp("diff", "base", "expert-3", "--json", cwd=root)))
    assert doc["summary"]["changed"] > 0 and doc["summary"]["unchanged"] > 0
    assert doc["summary"]["changed"] + doc["summary"]["unchanged"] == len(doc["tensors"])


def test_checkout(tour, family, tmp_path):
    root, ids, _ = tour
    out = tmp_path / "out"
    proc = run_mp("checkout", "expert-2", "-o", out, cwd=root)
    assert ok(proc).strip() == f"checked out {ids['expert-2'][:12]} to {out}"
    assert tree_bytes(out) == tree_bytes(family["expert-2"])
    again = run_mp("checkout", "base", "-o", out, "--force", cwd=root)
    ok(again)
    assert tree_bytes(out) == tree_bytes(family["base"])


def test_dash_C_and_MP_REPO_from_another_folder(tour, tmp_path):
    root, ids, _ = tour
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert ok(run_mp("-C", root, "log", "base", "--json", cwd=elsewhere)).count(ids["base"]) == 1
    assert json.loads(ok(run_mp("show", "base", "--json", cwd=elsewhere, env={"MP_REPO": str(root)})))["id"] == ids["base"]
    # -C wins over MP_REPO
    assert ok(run_mp("-C", root, "branch", cwd=elsewhere, env={"MP_REPO": str(elsewhere)})).count("\n") == 4
    # a subfolder of the repository finds it by searching upward
    sub = root / "deep" / "er"
    sub.mkdir(parents=True, exist_ok=True)
    assert json.loads(ok(run_mp("log", "base", "--json", cwd=sub)))[0]["id"] == ids["base"]
    assert list(elsewhere.iterdir()) == []


def test_quiet_add_prints_only_the_id(tmp_path, family):
    root = tmp_path / "new" / "repo"
    assert ok(run_mp("-C", root, "--quiet", "init")) == ""
    proc = run_mp("-C", root, "--quiet", "add", family["base"], "--name", "b")
    assert HEX32.fullmatch(ok(proc).strip()) and proc.stderr == ""
    again = run_mp("-C", root, "-q", "add", family["base"], "--name", "b")
    assert ok(again).strip() != proc.stdout.strip()
    with Repo.open(root) as repo:
        assert repo.show("b").to_json()["new_bytes"] == 0
        assert repo.commit("b").commit.parents == (bytes.fromhex(proc.stdout.strip()),)


def test_init_chunk_size(tmp_path, family):
    ok(run_mp("-C", tmp_path, "init", "--chunk-size", "4KiB"))
    ok(run_mp("-C", tmp_path, "add", family["base"] / "model.safetensors", "--name", "b"))
    with Repo.open(tmp_path) as repo:
        assert repo.chunk_size == 4096
        emb = next(r for r in repo.ls("b") if r.name == "model.embed_tokens.weight")
        with repo.store.read() as r:
            snap = r.object(r.object(repo.resolve("b")).snapshot)
            assert len(r.object(snap.tensors[emb.name]).chunks) == emb.bytes // 4096 == 8
