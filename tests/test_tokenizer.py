"""The merged tokenizer (mpstore/model/tokenizer.py), function by function, on generated families.

Tokenizers come from tools/make_family.py (a small byte-level BPE, written as plain JSON); where
the module claims to read a vocabulary as transformers does, transformers (a test dependency)
loads the same files and the two are compared. MergeKit itself is compared in
tests/test_mergekit_tokenizer.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import load_dir, run_mp
from make_family import Tokenizer, make_family

from mpstore import Repo
from mpstore.errors import BadMerge
from mpstore.model import tokenizer as T

B, E1, E2, E3 = "base", "expert-1", "expert-2", "expert-3"
NAMES = [B, E1, E2, E3]
TEMPLATE_A = "{% for m in messages %}{{ m.content }}{% endfor %}"
TEMPLATE_B = "{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}"
VOCAB = 96
# expert-1 adds two tokens and swaps three pairs of ids; expert-2 shares one of those tokens, adds
# another and a special token; expert-3 lacks the base's last four tokens.
DIFFERENT = Tokenizer(added={E1: ["Ġnewa", "Ġnewb"], E2: ["Ġnewa", "Ġnewc"]}, special={E2: ["<|tool|>"]},
                      dropped={E3: 4}, swapped={E1: 3})
SAME = Tokenizer(chat_template={B: TEMPLATE_A, E1: TEMPLATE_B + "\n", E2: TEMPLATE_B})


def files_of(folder: Path) -> dict[str, bytes]:
    """A model folder's non-tensor files, as a snapshot holds them."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.suffix != ".safetensors"}


def family(root: Path, tok: Tokenizer, arch: str = "qwen2") -> dict[str, Path]:
    return make_family(root, arch=arch, hidden=64, layers=1, vocab=VOCAB, dtype="f32", experts=3,
                       kinds=("partial",), tokenizer=tok)


@pytest.fixture(scope="module")
def different(tmp_path_factory) -> dict[str, Path]:
    return family(tmp_path_factory.mktemp("different"), DIFFERENT)


@pytest.fixture(scope="module")
def same(tmp_path_factory) -> dict[str, Path]:
    return family(tmp_path_factory.mktemp("same"), SAME)


def inputs_of(fam: dict[str, Path]) -> list[dict[str, bytes]]:
    return [files_of(fam[n]) for n in NAMES]


def spec(source: str | int = "union", tokens: dict | None = None, pad: int | None = None) -> dict:
    return {"source": source, "tokens": tokens or {}, "pad_to_multiple_of": pad}


def load(files: dict[str, bytes], where: Path, config: bytes) -> transformers.PreTrainedTokenizerBase:
    """transformers' view of a set of tokenizer files (with the model's config.json)."""
    where.mkdir(parents=True)
    for p, b in {**files, "config.json": config}.items():
        (where / p).parent.mkdir(parents=True, exist_ok=True)
        (where / p).write_bytes(b)
    return transformers.AutoTokenizer.from_pretrained(str(where))


# ------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_reads_the_vocabulary_transformers_loads(tmp_path, arch):
    fam = family(tmp_path, DIFFERENT, arch)
    for name in NAMES:
        tok = T.read_tokenizer(files_of(fam[name]), name)
        assert tok is not None
        assert tok.vocab == transformers.AutoTokenizer.from_pretrained(str(fam[name])).get_vocab(), name
        assert tok.rows == json.loads((fam[name] / "config.json").read_text())["vocab_size"]


def test_refuses_what_transformers_would_read_differently(different):
    base = files_of(different[B])
    config = json.loads(base["tokenizer_config.json"])
    cases = {
        "sentencepiece": ({k: v for k, v in base.items() if k != "tokenizer.json"} | {"tokenizer.model": b"\x0a"},
                          "only a sentencepiece tokenizer.model"),
        "special": ({**base, "tokenizer_config.json": json.dumps({**config, "pad_token": "<pad>"}).encode()},
                    "special token '<pad>' is not in its tokenizer.json"),
        "decoder": ({**base, "tokenizer_config.json": json.dumps(
            {**config, "added_tokens_decoder": {"7": {"content": "<s>"}}}).encode()}, "at id 7"),
        "legacy": ({**base, "added_tokens.json": b'{"<x>": 200}'}, "added_tokens.json adds token '<x>'"),
        "json": ({**base, "tokenizer.json": b"{"}, "tokenizer.json is not valid JSON"),
    }
    for name, (files, message) in cases.items():
        with pytest.raises(BadMerge, match=message):
            T.read_tokenizer(files, "the base")
        assert name
    assert T.read_tokenizer({"config.json": b"{}"}, "x") is None


# ------------------------------------------------------------------------------ building


def test_same_vocabulary_carries_the_chosen_files(same):
    inputs = inputs_of(same)
    for source, donor in (("base", 0), ("union", 0), (1, 1), (2, 2)):
        v = T.build(inputs, 0, spec(source), None)
        assert v.size is None and v.rows == [None] * 4 and not v.changed
        assert v.files == {p: b for p, b in inputs[donor].items() if T.is_tokenizer_file(p)}, source
        assert "tokenizer.json" in v.files and "config.json" not in v.files
    without = T.build(inputs, None, None, None)  # no tokenizer options: the template's files
    assert without.files == {p: b for p, b in inputs[0].items() if T.is_tokenizer_file(p)}


def test_union_numbers_new_tokens_model_by_model(different, tmp_path):
    inputs = inputs_of(different)
    v = T.build(inputs, 0, spec("union"), None, NAMES)
    base_vocab = T.read_tokenizer(inputs[0], B).vocab
    new = ["Ġnewa", "Ġnewb", "Ġnewc", "<|tool|>"]  # expert-1's by id, expert-2's, then added tokens
    want = {**base_vocab, **{t: VOCAB + i for i, t in enumerate(new)}}
    mk = load(v.files, tmp_path / "out", inputs[0]["config.json"])
    assert mk.get_vocab() == want
    assert v.tokens == v.length == v.size == VOCAB + 4
    added = {a.content: a for a in mk.added_tokens_decoder.values()}
    assert added["Ġnewa"].normalized and not added["Ġnewa"].special  # as transformers' add_tokens(str)
    assert added["<|tool|>"].special and not added["<|tool|>"].normalized  # expert-2's own definition
    config = json.loads(v.files["tokenizer_config.json"])
    assert config["added_tokens_decoder"][str(want["<|tool|>"])]["content"] == "<|tool|>"
    e1, e2, e3 = (T.read_tokenizer(inputs[i], NAMES[i]).vocab for i in (1, 2, 3))
    order = sorted(want, key=want.__getitem__)
    assert v.rows[0] == list(range(VOCAB)) + [-1] * 4
    for i, vocab in ((1, e1), (2, e2), (3, e3)):
        assert v.rows[i] == [vocab.get(t, -1) for t in order]
    assert v.rows[1][3:9] != list(range(3, 9))  # swapped ids map back to their tokens
    last = [want[t] for t in order[VOCAB - 4:VOCAB]]  # the tokens expert-3 lacks come from the base
    assert all(v.fills[i] == T.Fill("row", ((0, i),)) for i in last)
    assert v.fills[want["Ġnewa"]] == T.Fill("mean", ((1, e1["Ġnewa"]), (2, e2["Ġnewa"])))
    assert v.fills[want["Ġnewb"]] == T.Fill("row", ((1, e1["Ġnewb"]),))
    assert v.fills[want["<|tool|>"]] == T.Fill("row", ((2, e2["<|tool|>"]),))
    assert len(v.fills) == 8 and not v.forced
    nobase = T.build(inputs, None, spec("union"), None, NAMES)  # no base: no base preference, mean
    assert nobase.fills[last[0]] == T.Fill("mean", ((0, last[0]), (1, e1[order[last[0]]]), (2, last[0])))


def test_configured_tokens_force_and_padding(different):
    inputs = inputs_of(different)
    tokens = {"<|pad|>": {"source": {"kind": "zero"}, "force": False},
              "Ġnewc": {"source": 2, "force": True},
              "e": {"source": {"kind": "model_token", "model": 1, "token_id": None, "token": "Ġnewb"}, "force": True},
              "Ġzz": {"source": {"kind": "model_token", "model": 3, "token_id": 5, "token": None}, "force": False}}
    v = T.build(inputs, 0, spec("union", tokens, 64), None, NAMES)
    vocab = json.loads(v.files["tokenizer.json"])
    ids = {e["content"]: e["id"] for e in vocab["added_tokens"]} | vocab["model"]["vocab"]
    assert v.tokens == VOCAB + 6 and v.length == v.size == 128
    e1 = T.read_tokenizer(inputs[1], E1).vocab
    assert v.fills[ids["<|pad|>"]] == T.Fill("zero")
    assert v.fills[ids["Ġnewc"]] == T.Fill("row", ((2, v.rows[2][ids["Ġnewc"]]),))
    assert v.fills[ids["e"]] == T.Fill("row", ((1, e1["Ġnewb"]),))
    assert v.fills[ids["Ġzz"]] == T.Fill("row", ((3, 5),))
    assert v.forced == {ids["Ġnewc"], ids["e"]}
    assert T.build(inputs, 0, spec("base", pad=32), None).length == VOCAB  # already a multiple
    same_size = T.build(inputs, 0, spec("base", pad=64), None)
    assert same_size.length == same_size.size == 128 and same_size.rows[0] == list(range(VOCAB))


def test_refuses_fills_it_cannot_make(different):
    inputs = inputs_of(different)
    bad = {
        "needs a source": {"Ġnewa": {"source": None, "force": False}},
        "does not have the token": {"Ġnewb": {"source": 2, "force": False}},
        "has no token 'nope'": {"Ġnewa": {"source": {"kind": "model_token", "model": 1, "token": "nope",
                                                     "token_id": None}, "force": False}},
        "outside expert-1's 98 rows": {"Ġnewa": {"source": {"kind": "model_token", "model": 1, "token": None,
                                                            "token_id": 98}, "force": True}},
    }
    for message, tokens in bad.items():
        with pytest.raises(BadMerge, match=message):
            T.build(inputs, 0, spec("union", tokens), None, NAMES)
    # a token present everywhere and not forced needs no source at all
    present = T.build(inputs, 0, spec("base", {"a": {"source": None, "force": False}}), None)
    assert present.rows[0] is None and len(present.fills) == 4  # the four tokens expert-3 lacks
    with pytest.raises(BadMerge, match="needs expert-3's tokenizer.json"):
        T.build([{"config.json": b"{}"}] * 2, None, spec("base"), None, [E3, E1])
    with pytest.raises(BadMerge, match="source expert-1 has no tokenizer.json"):
        T.build([inputs[0], {"config.json": b"{}"}], 0, spec(1), None, [B, E1])
    short = {**inputs[2], "config.json": json.dumps({"vocab_size": 90}).encode()}
    with pytest.raises(BadMerge, match="past its 90 embedding rows"):
        T.build([inputs[0], short], 0, spec("union"), None, [B, E2])


def test_cuts_a_base_tokenizer_to_its_rows_as_mergekit(different, tmp_path):
    """A base whose tokenizer has more tokens than embedding rows loses the extra tokens, every
    merge with one as a part, and added tokens past the rows (MergeKit's get_stripped_tokenizer)."""
    e1 = files_of(different[E1])  # 98 tokens; the last two are Ġnewa, Ġnewb
    doc = json.loads(e1["tokenizer.json"])
    doc["model"]["vocab"]["Ġnewaa"] = 98
    doc["model"]["merges"].append(["Ġnewa", "a"])
    config = json.dumps({"model_type": "qwen2", "vocab_size": VOCAB}).encode()
    cut = {**e1, "tokenizer.json": json.dumps(doc).encode(), "config.json": config}
    v = T.build([cut], 0, spec("base"), None)
    out = json.loads(v.files["tokenizer.json"])
    kept = {t: i for t, i in doc["model"]["vocab"].items() if i < VOCAB}
    assert out["model"]["vocab"] == kept and v.tokens == VOCAB and v.size is None and v.rows == [None]
    assert out["model"]["merges"] == doc["model"]["merges"][:-1]
    assert load(v.files, tmp_path / "cut", config).get_vocab() == kept
    with pytest.raises(BadMerge, match="but a merge makes it"):  # a merged token cannot go
        T.build([{**e1, "config.json": json.dumps({"vocab_size": 90}).encode()}], 0, spec("base"), None)
    doc["model"]["type"] = "WordLevel"
    with pytest.raises(BadMerge, match="only a BPE tokenizer can be cut"):
        T.build([{**cut, "tokenizer.json": json.dumps(doc).encode()}], 0, spec("base"), None)
    with pytest.raises(BadMerge, match=re.escape("special token '<|tool|>' lies past")):
        T.build([{**files_of(different[E2]), "config.json": config}], 0, spec("base"), None)


# ------------------------------------------------------------------------------ chat template


@pytest.mark.parametrize("value,message", [
    ("chatml", "built-in templates, which mpstore does not ship"),
    ("llama3", "built-in templates"),
    ("my-template", "invalid chat_template"),
    ("{{ short }}", "invalid chat_template"),
    (3, "is `auto` or a Jinja template"),
])
def test_chat_template_values_refused(value, message):
    with pytest.raises(BadMerge, match=message):
        T.check_chat_template(value)


def test_chat_template_values_accepted():
    assert T.check_chat_template(None) is None and T.check_chat_template("") is None
    assert T.check_chat_template("auto") == "auto" and T.check_chat_template(TEMPLATE_A) == TEMPLATE_A


def test_chat_template_auto_takes_the_plurality(same, tmp_path):
    inputs = inputs_of(same)
    v = T.build(inputs, 0, None, "auto")  # B's (stripped) template is expert-1's and expert-2's
    assert v.files["chat_template.jinja"] == TEMPLATE_B.encode()
    assert "chat_template" not in json.loads(v.files["tokenizer_config.json"])
    assert load(v.files, tmp_path / "auto", inputs[0]["config.json"]).chat_template == TEMPLATE_B
    tie = T.build([inputs[1], inputs[0]], 1, spec("base"), "auto")  # one each: the base's wins
    assert tie.files["chat_template.jinja"] == TEMPLATE_A.encode()
    assert tie.files["tokenizer.json"] == inputs[0]["tokenizer.json"]
    none = inputs[3]  # expert-3 has no template: nothing changes
    assert T.build([none], None, None, "auto").files == {p: b for p, b in none.items() if T.is_tokenizer_file(p)}


def test_chat_template_text_replaces_every_other(same):
    inputs = inputs_of(same)
    extra = {**inputs[0], "additional_chat_templates/tools.jinja": b"{{ tools }}",
             "chat_template.jinja": TEMPLATE_B.encode()}
    v = T.build([extra], None, None, TEMPLATE_A + " ")
    assert v.files["chat_template.jinja"] == (TEMPLATE_A + " ").encode()  # as given, not stripped
    assert not any(p.startswith("additional_chat_templates/") for p in v.files)
    assert T.build([extra], None, None, "auto").files["chat_template.jinja"] == TEMPLATE_B.encode()
    with pytest.raises(BadMerge, match="chat_template needs a tokenizer"):
        T.build([{"config.json": b"{}"}], None, None, TEMPLATE_A)


# ------------------------------------------------------------------------------ tensors


def test_align_copies_rows_and_fills_as_mergekit(different):
    inputs = inputs_of(different)
    tokens = {"<|pad|>": {"source": {"kind": "zero"}, "force": False}, "Ġnewc": {"source": 2, "force": True}}
    v = T.build(inputs, 0, spec("union", tokens, 64), None, NAMES)
    tensors = [load_dir(different[n])["model.embed_tokens.weight"] for n in NAMES]
    out = T.align(tensors, v)
    assert all(t.shape == (128, 64) and t.dtype == torch.float32 for t in out)
    for i, rows in enumerate(v.rows):
        for tid, r in enumerate(rows):
            fill = v.fills.get(tid)
            if r >= 0 and tid not in v.forced:
                assert torch.equal(out[i][tid], tensors[i][r])
            elif fill.kind == "zero":
                assert not out[i][tid].any()
            elif fill.kind == "row":
                (m, row), = fill.sources
                assert torch.equal(out[i][tid], tensors[m][row])
            else:
                want = torch.zeros(64)
                for m, row in fill.sources:
                    want = want + tensors[m][row]
                assert torch.equal(out[i][tid], want / len(fill.sources))
        assert torch.equal(out[i][v.tokens:], torch.mean(out[i][:v.tokens], dim=0).expand(128 - v.tokens, 64))
    transposed = T.align([t.T for t in tensors], v, axis=1)
    assert all(torch.equal(a.T, b) for a, b in zip(transposed, out))


def test_align_means_in_the_compute_dtype():
    """The mean fill sums in the inputs' dtype as MergeKit does: in bfloat16, 1 + 2^-7 + 2^-7 rounds
    to 3 before the division (1.0), where a float32 mean would round to 1 + 2^-7."""
    rows = [torch.tensor([[1.0]]), torch.tensor([[1.0078125]]), torch.tensor([[1.0078125]])]
    v = T.Vocabulary({}, None, [[0, -1], [0, 0], [0, 0]], tokens=2, length=2,
                     fills={1: T.Fill("mean", ((0, 0), (1, 0), (2, 0)))})
    bf16 = T.align([r.to(torch.bfloat16) for r in rows], v)
    assert bf16[0][1].item() == 1.0 and bf16[0].dtype == torch.bfloat16
    assert T.align(rows, v)[0][1].item() == pytest.approx(1.0052083, abs=1e-6)
    assert torch.equal(bf16[1], rows[1].to(torch.bfloat16).expand(2, 1))  # its own row for both tokens


def test_align_refuses_tensors_that_do_not_fit(different):
    v = T.build(inputs_of(different), 0, spec("union"), None, NAMES)
    tensors = [load_dir(different[n])["model.embed_tokens.weight"] for n in NAMES]
    with pytest.raises(BadMerge, match="3 vocabulary tensors for 4 inputs"):
        T.align(tensors[:3], v)
    with pytest.raises(BadMerge, match="differ beyond the vocabulary axis"):
        T.align([*tensors[:3], tensors[3][:, :32]], v)
    with pytest.raises(BadMerge, match="input 2's vocabulary tensor has 90 rows, fewer than"):
        T.align([tensors[0], tensors[1][:90], *tensors[2:]], v)


def test_vocabulary_tensors_by_name():
    assert T.is_vocab_tensor("model.embed_tokens.weight") and T.is_vocab_tensor("lm_head.weight")
    assert not T.is_vocab_tensor("model.layers.0.mlp.up_proj.weight") and not T.is_vocab_tensor("model.norm.weight")
    assert T.is_tokenizer_file("tokenizer.json") and T.is_tokenizer_file("additional_chat_templates/x.jinja")
    assert not T.is_tokenizer_file("config.json") and not T.is_tokenizer_file("generation_config.json")


# ------------------------------------------------------------------------------ the plan's field


def test_parse_spec_from_mergekit_yaml():
    index = {"m/base": 0, "m/one": 1}.__getitem__
    assert T.parse_spec(None, None, index) is None
    assert T.parse_spec("union", None, index) == spec("union")
    assert T.parse_spec("m/one", None, index) == spec(1)
    block = {"tokens": {"<x>": {"source": {"kind": "zero"}, "force": True},
                        "<y>": {"source": "m/base"},
                        "<z>": {"source": {"kind": "model_token", "model": "m/one", "token_id": 4}},
                        "<w>": None},
             "pad_to_multiple_of": 8}
    assert T.parse_spec(None, block, index) == {
        "source": "union", "pad_to_multiple_of": 8,
        "tokens": {"<x>": {"source": {"kind": "zero"}, "force": True}, "<y>": {"source": 0, "force": False},
                   "<z>": {"source": {"kind": "model_token", "model": 1, "token_id": 4, "token": None}, "force": False},
                   "<w>": {"source": None, "force": False}}}
    assert T.parse_spec(None, {"source": "base", "pad_to_multiple_of": 0}, index) == spec("base")


@pytest.mark.parametrize("source,block,message", [
    ("base", {"source": "base"}, "not both"),
    (None, {"source": 3}, "is base, union or an input model"),
    (None, {"pad_to_multiple_of": -8}, "whole number >= 0"),
    (None, {"pad_to_multiple_of": True}, "whole number >= 0"),
    (None, {"vocab": 3}, "is a mapping with source, tokens and pad_to_multiple_of"),
    (None, {"tokens": ["<x>"]}, "maps a token to"),
    (None, {"tokens": {"<x>": {"force": "yes"}}}, "force is true or false"),
    (None, {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "m/one"}}}}, "one of token_id and token"),
    (None, {"tokens": {"<x>": {"source": {"kind": "random"}}}}, "is a model, {kind: zero}"),
])
def test_parse_spec_refuses(source, block, message):
    with pytest.raises(BadMerge, match=message):
        T.parse_spec(source, block, {"m/one": 1}.__getitem__)


# ------------------------------------------------------------------------------ the generator


def test_make_family_tokenizer_is_off_by_default(tmp_path, different):
    plain = make_family(tmp_path / "plain", hidden=64, layers=1, vocab=VOCAB, experts=1)
    assert not any(T.is_tokenizer_file(p) for p in files_of(plain[B]))
    base = load_dir(different[B])["model.embed_tokens.weight"]
    e1, e3 = (load_dir(different[n])["model.embed_tokens.weight"] for n in (E1, E3))
    assert e1.shape == (VOCAB + 2, 64) and e3.shape == (VOCAB - 4, 64)
    assert torch.equal(e1[3], base[4]) and torch.equal(e1[4], base[3]) and torch.equal(e1[9:VOCAB], base[9:])
    assert torch.equal(e3, base[:VOCAB - 4])  # partial experts keep the base's embeddings
    with pytest.raises(ValueError, match="one token per row"):
        make_family(tmp_path / "bad", hidden=64, layers=1, vocab=VOCAB, experts=1,
                    tokenizer=Tokenizer(tokens=80, added={E1: ["x"]}))


def test_a_tokenizer_merge_is_shown_and_replayed(different, tmp_path):
    """`mp show` (text and --json) of a merge whose tokenizer names models (commit ids in the
    plan, hex in JSON), and `mp replay` of it: identical."""
    root = tmp_path / "repo"
    with Repo.init(root) as repo:
        for key, path in different.items():
            repo.add(path, key, base=None if key == "base" else "base")
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 0.5}},
                                             {"model": "expert-1", "parameters": {"weight": 0.5}}],
        "tokenizer": {"source": "expert-1", "tokens": {"<s>": {"source": {"kind": "model_token", "model": "base",
                                                                          "token": "<s>"}, "force": True}}},
        "dtype": "float32"}))
    assert run_mp("-C", root, "merge", "--config", cfg, "-b", "m").returncode == 0
    shown = run_mp("-C", root, "show", "m", "--json")
    assert shown.returncode == 0, shown.stderr
    with Repo.open(root) as repo:
        e1, base = repo.resolve("expert-1").hex(), repo.resolve("base").hex()
    tok = json.loads(shown.stdout)["plan"]["tokenizer"]
    assert tok["source"] == e1 and tok["tokens"]["<s>"]["source"]["model"] == base
    assert f"tokens  from {e1[:12]}, 1 configured" in run_mp("-C", root, "show", "m").stdout
    assert run_mp("-C", root, "replay", "m").stdout.split() == ["identical"]
