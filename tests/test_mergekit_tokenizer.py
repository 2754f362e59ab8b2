"""MergeKit differential of tokenizer merges: `tokenizer_source`, the `tokenizer:` block, `chat_template`.

Three small bfloat16 families with tokenizers (tools/make_family.py `Tokenizer`), merged by
MergeKit 0.1.5 and by mpstore (`Repo.merge(from_yaml(...))`) with `dtype: bfloat16`:

- "same": every model has the base's vocabulary; the base, expert-1 and expert-2 carry chat
  templates (expert-1's and expert-2's equal but for a trailing newline). MergeKit's tensors are
  bit-identical with or without `tokenizer_source`, so mpstore's must be too, and mpstore's
  merged commit carries the chosen model's tokenizer files byte for byte; chat templates (text,
  `auto`, and `auto` without a tokenizer source, where MergeKit copies the donor's tokenizer)
  land in chat_template.jinja as MergeKit writes them;
- "diff": expert-1 adds two tokens and swaps three pairs of ids, expert-2 shares one of those,
  adds another and a special token, expert-3 lacks the base's last four tokens: every branch of
  MergeKit's fill rule (one donor, the base, the mean over the inputs that have a token, zero,
  configured sources, `force`) and `pad_to_multiple_of` occur. `linear` with weight 1 on one input
  and 0 on the others returns that input's aligned tensor exactly, so each input's alignment is
  compared on its own, against mpstore's `tokenizer.align` directly and through `Repo.merge`;
- "pad": the tokenizer has 100 tokens for 128 embedding rows: `tokenizer_source: base` cuts the
  rows to the vocabulary and `pad_to_multiple_of` grows them again with the mean row.

MergeKit numbers the tokens a union adds in an order that changes from process to process (a Rust
hash map over models in a Python set's order), so vocabulary tensors are compared token by token
(each tool's own token -> id map, read by transformers); the padding rows, means over rows in
that order, may then differ by one bfloat16 ulp. Everything else is compared bit for bit.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import yaml
from conftest import load_dir
from make_family import Tokenizer, make_family
from mergekit_oracle import E1, E2, E3, MERGEKIT_VERSION, B, config_doc, require_mergekit, running, ulp_distance

from mpstore import Repo
from mpstore.errors import BadMerge
from mpstore.merge.request import from_yaml
from mpstore.model import tokenizer as T

require_mergekit(module=True)

TEMPLATE_A = "{% for m in messages %}{{ m.content }}{% endfor %}"
TEMPLATE_B = "{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}"
TEMPLATE_C = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
FAMILIES = {
    "same": ({"hidden": 64, "layers": 2, "vocab": 128, "experts": 2, "kinds": ("dense", "lora"), "seed": 31},
             Tokenizer(chat_template={B: TEMPLATE_A, E1: TEMPLATE_B + "\n", E2: TEMPLATE_B})),
    "diff": ({"hidden": 64, "layers": 1, "vocab": 96, "experts": 3, "kinds": ("dense", "partial", "lora"), "seed": 32},
             Tokenizer(added={E1: ["Ġnewa", "Ġnewb"], E2: ["Ġnewa", "Ġnewc"]}, special={E2: ["<|tool|>"]},
                       dropped={E3: 4}, swapped={E1: 3})),
    "pad": ({"hidden": 64, "layers": 1, "vocab": 128, "experts": 2, "kinds": ("dense", "lora"), "seed": 33},
            Tokenizer(tokens=100)),
}
MODELS = {"same": [B, E1, E2], "diff": [B, E1, E2, E3], "pad": [B, E1, E2]}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class Case:
    family: str
    method: str
    models: list  # [(model key, parameters or None)]
    base: str | None = B
    extra: dict = field(default_factory=dict)  # tokenizer keys; "@key" names a model of the family
    parameters: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # MergeKit options (the driver's "options")

    def doc(self, where: dict[str, str]) -> dict:
        return config_doc(self.method, self.models, where, base=self.base, parameters=self.parameters,
                          dtype="bfloat16", **_subst(self.extra, where))


def _subst(obj: Any, where: dict[str, str]) -> Any:
    if isinstance(obj, str) and obj.startswith("@"):
        return where[obj[1:]]
    if isinstance(obj, dict):
        return {k: _subst(v, where) for k, v in obj.items()}
    return obj


def select(family: str, i: int, extra: dict) -> Case:
    """linear with weight 1 on input i and 0 on the others: MergeKit's output is input i's
    tensors after the vocabulary alignment, exactly."""
    return Case(family, "linear", [(m, {"weight": 1.0 if j == i else 0.0}) for j, m in enumerate(MODELS[family])],
                extra=extra)


TA = [(E1, {"weight": 0.6}), (E2, {"weight": -0.3})]
CONFIGURED = {"source": "union", "pad_to_multiple_of": 64, "tokens": {
    "<|pad|>": {"source": {"kind": "zero"}},
    "Ġnewc": {"source": f"@{E2}", "force": True},
    "e": {"source": {"kind": "model_token", "model": f"@{E1}", "token": "Ġnewb"}, "force": True},
    "Ġzz": {"source": {"kind": "model_token", "model": f"@{E3}", "token_id": 5}},
}}
CASES: dict[str, Case] = {
    # no tokenizer option: MergeKit copies the base's tokenizer files (mergekit-yaml's default)
    "same_plain": Case("same", "task_arithmetic", TA, parameters={"lambda": 0.9}, options={"copy_tokenizer": True}),
    "same_base": Case("same", "task_arithmetic", TA, extra={"tokenizer_source": "base"}, parameters={"lambda": 0.9}),
    "same_model": Case("same", "task_arithmetic", TA, extra={"tokenizer_source": f"@{E1}"},
                       parameters={"lambda": 0.9}),
    "same_union": Case("same", "task_arithmetic", TA, extra={"tokenizer": {"source": "union"}},
                       parameters={"lambda": 0.9}),
    "same_text": Case("same", "task_arithmetic", TA, extra={"tokenizer_source": "base", "chat_template": TEMPLATE_C},
                      parameters={"lambda": 0.9}),
    "same_auto": Case("same", "task_arithmetic", TA, extra={"tokenizer_source": "base", "chat_template": "auto"},
                      parameters={"lambda": 0.9}),
    "same_auto_copy": Case("same", "task_arithmetic", TA, extra={"chat_template": "auto"},
                           parameters={"lambda": 0.9}, options={"copy_tokenizer": True}),
    "diff_union_ta": Case("diff", "task_arithmetic", [(E1, {"weight": 0.5}), (E2, {"weight": 0.3}),
                                                      (E3, {"weight": 0.4})], extra={"tokenizer_source": "union"}),
    "diff_union_nobase": Case("diff", "linear", [(B, {"weight": 0.4}), (E1, {"weight": 0.3}), (E2, {"weight": 0.2}),
                                                 (E3, {"weight": 0.1})], base=None,
                              extra={"tokenizer_source": "union"}),
    "pad_cut": Case("pad", "task_arithmetic", TA, extra={"tokenizer_source": "base"}),
    **{f"diff_union_sel{i}": select("diff", i, {"tokenizer_source": "union"}) for i in range(4)},
    **{f"diff_tokens_sel{i}": select("diff", i, {"tokenizer": CONFIGURED}) for i in range(4)},
    **{f"pad_grow_sel{i}": select("pad", i, {"tokenizer": {"source": "base", "pad_to_multiple_of": 48}})
       for i in range(3)},
}
SELECT = [n for n in CASES if "_sel" in n]


@dataclass
class Out:
    folder: Path
    tensors: dict[str, torch.Tensor]
    vocab: dict[str, int]  # token -> id, as transformers loads the output's tokenizer


@dataclass
class Runs:
    families: dict[str, dict[str, Path]]
    yaml_mp: dict[str, Path]
    mergekit: dict[str, Out]
    mk_errors: dict[str, str | None]
    mpstore: dict[str, Out]
    mp_errors: dict[str, str]  # mpstore's error per case, until and unless it merges
    repo: Path


def _ref(family: str, key: str) -> str:
    return f"{family}-{key}"


def _out(folder: Path) -> Out:
    return Out(folder, load_dir(folder), transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("mktokenizer")
    families = {f: make_family(root / f, arch="qwen2", dtype="bf16", tokenizer=tok, **spec)
                for f, (spec, tok) in FAMILIES.items()}
    (root / "cfg").mkdir()
    jobs, yaml_mp = [], {}
    for name, case in CASES.items():
        paths = {k: str(v) for k, v in families[case.family].items()}
        mk_yaml, yaml_mp[name] = root / "cfg" / f"{name}.mergekit.yml", root / "cfg" / f"{name}.mpstore.yml"
        mk_yaml.write_text(yaml.safe_dump(case.doc(paths), sort_keys=False, allow_unicode=True), encoding="utf-8")
        yaml_mp[name].write_text(yaml.safe_dump(case.doc({k: _ref(case.family, k) for k in paths}), sort_keys=False,
                                                allow_unicode=True), encoding="utf-8")
        jobs.append({"name": name, "config": str(mk_yaml), "out": str(root / "mk" / name), "seed": None,
                     "options": case.options})
    mp, mp_errors = {}, {}
    t1 = time.perf_counter()
    with running(jobs, root) as driver:
        with Repo.init(root / "repo") as repo:
            for f, fam in families.items():
                for key, path in fam.items():
                    repo.add(path, _ref(f, key), base=None if key == B else _ref(f, B))
            for name in CASES:
                try:  # one failing merge must not hide the others
                    repo.merge(from_yaml(yaml_mp[name]), f"m-{name}", threads=2)
                    repo.checkout(f"m-{name}", root / "mp" / name)
                    mp[name] = _out(root / "mp" / name)
                except Exception as e:  # recorded; the tests that need this merge report it
                    mp_errors[name] = "".join(traceback.format_exception_only(type(e), e)).strip()
        t2 = time.perf_counter()
        info = driver.finish()
    assert info["mergekit"] == MERGEKIT_VERSION, info
    errors = {job: r["error"] for job, r in info["jobs"].items()}
    mk = {name: _out(out) for name, out in driver.out.items() if errors[name] is None}
    print(f"\n[mergekit tokenizer] setup {t1 - t0:.1f}s; mpstore {len(CASES)} merges {t2 - t1:.1f}s; "
          f"MergeKit waited {time.perf_counter() - t2:.1f}s more")
    return Runs(families, yaml_mp, mk, errors, mp, mp_errors, root / "repo")


def _mk(runs: Runs, name: str) -> Out:
    assert runs.mk_errors[name] is None, f"MergeKit failed on {name}:\n{runs.mk_errors[name]}"
    return runs.mergekit[name]


def _mp(runs: Runs, name: str) -> Out:
    assert name not in runs.mp_errors, f"mpstore failed on {name}: {runs.mp_errors[name]}"
    return runs.mpstore[name]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.suffix != ".safetensors"}


def _vocab_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def compare(mk: Out, mp: Out, tokens: int, pad_ulps: int = 0) -> list[str]:
    """Where `mp` differs from `mk`: tensors by name, vocabulary tensors token by token (rows past
    the `tokens` real tokens, the padding, within pad_ulps bf16 ulps)."""
    bad = []
    assert sorted(mk.tensors) == sorted(mp.tensors), sorted(set(mk.tensors) ^ set(mp.tensors))
    assert set(mk.vocab) == set(mp.vocab), sorted(set(mk.vocab) ^ set(mp.vocab))[:5]
    for n, a in mk.tensors.items():
        b = mp.tensors[n]
        assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16, (n, a.shape, b.shape, a.dtype, b.dtype)
        if n in VOCAB_TENSORS:
            for tok, i in mk.vocab.items():
                if not torch.equal(a[i], b[mp.vocab[tok]]):
                    bad.append(f"{n} token {tok!r}: {int(ulp_distance(a[i], b[mp.vocab[tok]]).max())} ulp")
            far = int(ulp_distance(a[tokens:], b[tokens:]).max()) if a.shape[0] > tokens else 0
            if far > pad_ulps:
                bad.append(f"{n} padding rows: {far} ulp")
        elif not torch.equal(a, b):
            bad.append(f"{n}: {int((a != b).sum())} elements differ, up to {int(ulp_distance(a, b).max())} ulp")
    return bad


def _inputs(runs: Runs, name: str) -> tuple[list[dict[str, bytes]], int | None, dict | None, object]:
    """What the executor would give tokenizer.build for a case (refs resolved to input numbers)."""
    case = CASES[name]
    models = [m for m, _ in case.models]
    doc = case.doc({k: k for k in runs.families[case.family]})
    spec = T.parse_spec(doc.get("tokenizer_source"), doc.get("tokenizer"), models.index)
    base = models.index(case.base) if case.base in models else None
    return [_files(runs.families[case.family][m]) for m in models], base, spec, doc.get("chat_template")


# ------------------------------------------------------------------------------ MergeKit alone


def test_mergekit_merges_every_case(runs):
    failed = {n: e.strip().splitlines()[-1] for n, e in runs.mk_errors.items() if e}
    assert set(runs.mk_errors) == set(CASES) and not failed, failed


@pytest.mark.parametrize("name", ["same_base", "same_model", "same_union", "same_text", "same_auto"])
def test_mergekit_same_vocabulary_tensors_are_bit_identical(runs, name):
    """The issue's premise: with one vocabulary, a tokenizer option changes no tensor in MergeKit."""
    plain, mk = _mk(runs, "same_plain"), _mk(runs, name)
    assert sorted(plain.tensors) == sorted(mk.tensors)
    for n, t in plain.tensors.items():
        assert torch.equal(t.view(torch.int16), mk.tensors[n].view(torch.int16)), n


@pytest.mark.parametrize("name", SELECT)
def test_align_is_mergekits_permuted_vocabulary(runs, name, tmp_path):
    """tokenizer.build + tokenizer.align give each input's vocabulary tensors exactly as MergeKit's
    PermutedVocabulary does (MergeKit's `linear` selecting that input returns them)."""
    case, mk = CASES[name], _mk(runs, name)
    inputs, base, spec, template = _inputs(runs, name)
    v = T.build(inputs, base, spec, template)
    for p, b in {**v.files, "config.json": inputs[base]["config.json"]}.items():
        (tmp_path / p).write_bytes(b)
    mine = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).get_vocab()
    assert set(mine) == set(mk.vocab)
    assert (v.size or _vocab_size(runs.families[case.family][B])) == _vocab_size(mk.folder) == v.length
    selected = next(j for j, (_, p) in enumerate(case.models) if p["weight"] == 1.0)
    for n in VOCAB_TENSORS:
        tensors = [load_dir(runs.families[case.family][m])[n] for m, _ in case.models]
        aligned = T.align(tensors, v)[selected]
        ours = Out(tmp_path, {n: aligned}, mine)
        theirs = Out(mk.folder, {n: mk.tensors[n]}, mk.vocab)
        assert not compare(theirs, ours, v.tokens, pad_ulps=1 if case.family == "diff" else 0)


# ------------------------------------------------------------------------------ mpstore against MergeKit


@pytest.mark.parametrize("name", list(CASES))
def test_tensors_match_mergekit(runs, name):
    """Every tensor bit-equal to MergeKit's; vocabulary tensors token by token."""
    mk, mp = _mk(runs, name), _mp(runs, name)
    tokens = len(mk.vocab)
    bad = compare(mk, mp, tokens, pad_ulps=1 if CASES[name].family == "diff" else 0)
    assert not bad, f"{name}: mpstore differs from MergeKit {MERGEKIT_VERSION}:\n  " + "\n  ".join(bad[:20])
    assert _vocab_size(mp.folder) == _vocab_size(mk.folder) == mp.tensors["model.embed_tokens.weight"].shape[0]


@pytest.mark.parametrize("name", ["same_base", "same_model", "same_union", "same_text", "same_auto", "same_auto_copy"])
def test_same_vocabulary_merges_are_the_plain_merge(runs, name):
    plain, mp = _mp(runs, "same_plain"), _mp(runs, name)
    for n, t in plain.tensors.items():
        assert torch.equal(t.view(torch.int16), mp.tensors[n].view(torch.int16)), n


@pytest.mark.parametrize("name,donor", [("same_plain", B), ("same_base", B), ("same_model", E1), ("same_union", B)])
def test_same_vocabulary_carries_the_chosen_tokenizer_files(runs, name, donor):
    mp = _mp(runs, name)
    want = {p: b for p, b in _files(runs.families["same"][donor]).items() if T.is_tokenizer_file(p)}
    got = {p: b for p, b in _files(mp.folder).items() if T.is_tokenizer_file(p)}
    assert got == want


@pytest.mark.parametrize("name", ["same_text", "same_auto", "same_auto_copy"])
def test_chat_template_is_mergekits(runs, name):
    """Text as given; `auto`: the plurality (expert-1's and expert-2's, whitespace-stripped)."""
    template = TEMPLATE_C if name == "same_text" else TEMPLATE_B
    mk, mp = _mk(runs, name), _mp(runs, name)
    assert (mk.folder / "chat_template.jinja").read_bytes() == template.encode()
    assert (mp.folder / "chat_template.jinja").read_bytes() == template.encode()
    loaded = transformers.AutoTokenizer.from_pretrained(str(mp.folder))
    assert loaded.chat_template == template
    assert "chat_template" not in json.loads((mp.folder / "tokenizer_config.json").read_text())
    others = {p: b for p, b in _files(mp.folder).items() if T.is_tokenizer_file(p) and p != "chat_template.jinja"}
    base = _files(runs.families["same"][B])
    assert others["tokenizer.json"] == base["tokenizer.json"]


def test_union_tokenizer_is_mergekits(runs):
    """The union's tokens and their properties are MergeKit's; the base's tokens keep their ids."""
    mk, mp = _mk(runs, "diff_union_ta"), _mp(runs, "diff_union_ta")
    base = transformers.AutoTokenizer.from_pretrained(str(runs.families["diff"][B])).get_vocab()
    assert all(mp.vocab[t] == mk.vocab[t] == i for t, i in base.items())
    a = transformers.AutoTokenizer.from_pretrained(str(mk.folder)).added_tokens_decoder
    b = transformers.AutoTokenizer.from_pretrained(str(mp.folder)).added_tokens_decoder
    assert {t.content: str(t) for t in a.values()} == {t.content: str(t) for t in b.values()}


def test_builtin_chat_template_is_refused(runs, tmp_path):
    doc = yaml.safe_load(runs.yaml_mp["same_base"].read_text()) | {"chat_template": "chatml"}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(doc))
    with Repo.open(runs.repo) as repo, pytest.raises(BadMerge, match="built-in templates, which mpstore does not ship"):
        repo.merge(from_yaml(tmp_path / "c.yml"), "m-chatml")
