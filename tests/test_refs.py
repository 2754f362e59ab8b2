"""Naming commits: branches, tags/, id prefixes, REF~N, and which names are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_user_error, run_mp, store_fingerprint
from safetensors.torch import save_file

from mpstore.errors import AmbiguousRef, BadRefName, UnknownRef
from mpstore.store.objects import Blob, Commit
from mpstore.store.refs import MIN_PREFIX, TAG_PREFIX


def tiny_model(path, value: float):
    """A one-tensor .safetensors file whose bytes depend on `value`."""
    save_file({"w": torch.full((4,), value)}, str(path))
    return path


@pytest.fixture
def chain(repo, tmp_path):
    """Four commits on branch `x` (oldest first), each a different one-tensor model."""
    ids = [repo.add(tiny_model(tmp_path / f"v{i}.safetensors", i), "x", message=f"v{i}").commit for i in range(4)]
    return ids


def test_repeated_adds_to_a_branch_chain_their_parents(repo, chain):
    commits = [repo.commit(c.hex()).commit for c in chain]
    assert commits[0].parents == ()
    for prev, c in zip(chain, commits[1:]):
        assert c.parents == (prev,)
    assert repo.branches() == {"x": chain[-1]}
    assert [e.id for e in repo.log("x")] == chain[::-1]
    assert [e.commit.message for e in repo.log()] == ["v3", "v2", "v1", "v0"]  # HEAD is x
    assert repo.current_branch() == "x"


def test_tilde_walks_first_parents(repo, chain):
    assert repo.resolve("x") == chain[3]
    assert repo.resolve("x~0") == chain[3]
    assert repo.resolve("x~") == chain[2]
    assert repo.resolve("x~1") == chain[2]
    assert repo.resolve("x~3") == chain[0]
    assert repo.resolve("x~~") == chain[1]
    assert repo.resolve("x~1~2") == chain[0]
    assert repo.resolve(chain[3].hex()[:8] + "~2") == chain[1]
    with pytest.raises(UnknownRef, match="has no parent"):
        repo.resolve("x~4")


def test_id_prefixes_of_six_or_more_hex_characters(repo, chain):
    cid = chain[1]
    for n in (MIN_PREFIX, 7, 12, 32):
        assert repo.resolve(cid.hex()[:n]) == cid
    assert repo.resolve(cid.hex()[:10].upper()) == cid
    for short in (cid.hex()[:5], cid.hex()[:1]):
        with pytest.raises(UnknownRef):
            repo.resolve(short)
    with pytest.raises(UnknownRef):
        repo.resolve("zzzzzzzz")
    with pytest.raises(UnknownRef):
        repo.resolve(cid.hex() + "00")  # longer than any id


def test_prefixes_name_commits_only(repo, chain):
    """A snapshot or blob id is an object id too, but not something a ref can name."""
    snap = repo.show("x").to_json()["snapshot"]
    with pytest.raises(UnknownRef):
        repo.resolve(snap)
    with pytest.raises(UnknownRef):
        repo.resolve(snap[:8])


def _probe_commits(snapshot: bytes, n: int):
    for i in range(n):
        c = Commit(snapshot, (), f"probe {i}", "t", "2026-01-01T00:00:00Z")
        yield c.id, c


def test_a_prefix_shared_by_two_commits_is_ambiguous(repo, chain):
    """Search for two commit encodings whose ids share 6 hex digits (a birthday search over a
    few thousand candidates), store both, and resolve the shared prefix."""
    snapshot = repo.commit("x").commit.snapshot
    seen: dict[str, tuple[bytes, Commit]] = {}
    for oid, c in _probe_commits(snapshot, 200_000):
        p = oid.hex()[:MIN_PREFIX]
        if p in seen:
            pair = [seen[p], (oid, c)]
            break
        seen[p] = (oid, c)
    else:
        pytest.fail("no 6-hex collision found")
    repo.store.write(lambda txn: [txn.put_object(c) for _, c in pair])
    prefix = pair[0][0].hex()[:MIN_PREFIX]
    with pytest.raises(AmbiguousRef) as err:
        repo.resolve(prefix)
    assert all(oid.hex()[:12] in str(err.value) for oid, _ in pair)
    assert prefix in str(err.value)
    for oid, _ in pair:
        assert repo.resolve(oid.hex()) == oid
        # the shortest prefix that tells them apart also works
        other = next(o for o, _ in pair if o != oid).hex()
        n = next(i for i in range(32) if oid.hex()[i] != other[i]) + 1
        assert repo.resolve(oid.hex()[: max(n, MIN_PREFIX)]) == oid


def test_a_prefix_shared_by_a_commit_and_a_blob_is_not_ambiguous(repo, chain):
    snapshot = repo.commit("x").commit.snapshot
    commits = {oid.hex()[:MIN_PREFIX]: (oid, c) for oid, c in _probe_commits(snapshot, 20_000)}
    for j in range(2_000_000):
        blob = Blob(j, repo.chunk_size, ())
        bid = blob.id
        if bid.hex()[:MIN_PREFIX] in commits:
            break
    else:
        pytest.fail("no commit/blob prefix collision found")
    cid, commit = commits[bid.hex()[:MIN_PREFIX]]
    repo.store.write(lambda txn: (txn.put_object(blob), txn.put_object(commit)))
    assert repo.resolve(cid.hex()[:MIN_PREFIX]) == cid


def test_branch_names_win_over_id_prefixes(repo, chain, tmp_path):
    name = chain[0].hex()[:8]
    other = repo.add(tiny_model(tmp_path / "o.safetensors", 99.0), name).commit
    assert repo.resolve(name) == other
    assert repo.resolve(chain[0].hex()[:9]) == chain[0]


def test_tags_prefix_names_tag_refs(repo, chain):
    """There is no tag verb yet; a tag ref written through the store resolves as `tags/NAME`."""
    repo.store.write(lambda txn: txn.add_ref_if_new(TAG_PREFIX + "v1.0", chain[1], "tag", "2026-01-01T00:00:00Z"))
    assert repo.tags() == {"v1.0": chain[1]}
    assert repo.resolve("tags/v1.0") == chain[1]
    assert repo.resolve("tags/v1.0~1") == chain[0]
    with pytest.raises(UnknownRef):
        repo.resolve("v1.0")  # a bare name is a branch
    with pytest.raises(UnknownRef):
        repo.resolve("tags/v2")


def test_base_is_recorded(repo, family):
    b = repo.add(family["base"], "base").commit
    e = repo.add(family["expert-2"], "e2", base="base").commit
    e3 = repo.add(family["expert-3"], "e3", base=b.hex()[:7], message="lora expert").commit
    assert repo.commit("e2").commit.base == b
    assert repo.show("e3").to_json()["base"] == b.hex()
    assert repo.show("e3").to_json()["message"] == "lora expert"
    assert repo.show("e3").to_json()["parents"] == []  # base is not a parent
    assert repo.commit("base").commit.base is None
    assert repo.branches() == {"base": b, "e2": e, "e3": e3}
    with pytest.raises(UnknownRef):
        repo.add(family["expert-1"], "e1", base="nope")
    assert "e1" not in repo.branches()


BAD_NAMES = [
    "", "..", "a..b", "-x", "--force", "/x", "x/", "a//b", "a\x01b", "a\nb", "tab\tx", "del\x7f",
    ".hidden", "a/.b", "x.lock", "x.", "HEAD", "tags/v1", "with space", "é", "a~1", "a:b", "a^", "a*",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_invalid_branch_names_are_refused_and_change_nothing(repo, family, name):
    repo.add(family["base"], "base")
    before = store_fingerprint(repo)
    with pytest.raises(BadRefName, match="invalid branch name"):
        repo.add(family["expert-1"], name)
    assert store_fingerprint(repo) == before


GOOD_NAMES = ["main", "team/expert-1", "v1.2", "a_b+c@d", "x-y.z/w"]


def test_valid_branch_names_are_accepted(repo, family):
    for name in GOOD_NAMES:
        repo.add(family["base"], name)
    assert sorted(repo.branches()) == sorted(GOOD_NAMES)
    for name in GOOD_NAMES:
        assert repo.resolve(name) == repo.branches()[name]


def test_ambiguous_prefix_through_the_cli(repo, chain):
    """Same search as above, then `mp show PREFIX` reports it on one line."""
    snapshot = repo.commit("x").commit.snapshot
    seen = {}
    for oid, c in _probe_commits(snapshot, 200_000):
        p = oid.hex()[:MIN_PREFIX]
        if p in seen:
            pair = (seen[p], c)
            break
        seen[p] = c
    repo.store.write(lambda txn: [txn.put_object(c) for c in pair])
    before = store_fingerprint(repo)
    proc = run_mp("-C", repo.root, "show", p)
    assert_user_error(proc, "ambiguous", p)
    assert store_fingerprint(repo) == before
