"""The merged model's tokenizer: MergeKit 0.1.5's `tokenizer_source`, `tokenizer:` and `chat_template`.

Owns, as pure functions over file bytes and tensors: reading a model's vocabulary from its
tokenizer files as plain JSON (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
added_tokens.json), building the merged vocabulary as MergeKit does (`base`, one input's, or the
`union`, plus the `tokens` a config adds), the tokenizer files of the merged commit, the chat
template, and `align`, which puts a vocabulary tensor (embed_tokens, lm_head) of every input into
the merged vocabulary with MergeKit's fill rule for tokens an input lacks. It never touches the
store, never imports transformers (MergeKit loads tokenizers through it; this module reads the
files it would read and refuses, in one line, what transformers would read differently), and
imports torch only inside `align`, so request parsing can import it cheaply.

Where MergeKit is not deterministic the order here is fixed and documented: MergeKit numbers the
tokens a union adds in the iteration order of a Rust hash map (different in every process) over
models in the order of a Python set; here they are numbered model by model (the base first, then
the inputs in order) and, within a model, by its token ids.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import BadMerge, quoted

if TYPE_CHECKING:
    import torch

# Files that make up a tokenizer: the merged commit takes all of them from `Vocabulary.files` and
# none from the template (the model whose files the output otherwise carries).
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
})
TEMPLATE_DIR = "additional_chat_templates/"  # transformers' named chat templates, one .jinja each
# Slow-tokenizer files a changed vocabulary would contradict (transformers prefers tokenizer.json,
# MergeKit's output has none of them).
STALE_WHEN_CHANGED = frozenset({"added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt"})
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# MergeKit 0.1.5's built-in chat templates (mergekit/_data/chat_templates). Their text is
# LGPL-3.0 and is not shipped with mpstore: naming one is refused with a way out.
BUILTIN_TEMPLATES = frozenset({"alpaca", "chatml", "exaone", "llama3", "mistral"})
# Tensors with a vocabulary axis (always axis 0) in MergeKit's architecture definitions.
VOCAB_TENSORS = frozenset({
    "model.embed_tokens.weight", "lm_head.weight", "lm_head.bias", "embed_tokens.weight",
    "model.language_model.embed_tokens.weight", "model.tok_embeddings.weight", "output.weight",
    "embed_out.weight", "gpt_neox.embed_in.weight", "transformer.wte.weight", "transformer.embd.wte.weight",
    "transformer.word_embeddings.weight", "transformer.embedding.word_embeddings.weight",
    "transformer.output_layer.weight", "backbone.embeddings.weight", "shared.weight",
    "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "embeddings.word_embeddings.weight",
    "bert.embeddings.word_embeddings.weight", "roberta.embeddings.word_embeddings.weight",
    "distilbert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", "cls.predictions.bias",
    "lm_head.decoder.weight", "lm_head.linear.weight", "lm_head.linear.bias",
    "vocab_projector.weight", "vocab_projector.bias",
})
VOCAB_AXIS = 0


def is_vocab_tensor(name: str) -> bool:
    """Whether `name` is indexed by token on axis 0 (`VOCAB_AXIS`): its rows follow the vocabulary."""
    return name in VOCAB_TENSORS


def is_tokenizer_file(path: str) -> bool:
    """Whether a snapshot file belongs to the tokenizer (replaced as a whole by `Vocabulary.files`)."""
    return path in TOKENIZER_FILES or path.startswith(TEMPLATE_DIR)


# ------------------------------------------------------------------------------ the plan's fields


def check_chat_template(value: object) -> str | None:
    """A YAML `chat_template` as MergeKit accepts it: `auto`, or Jinja text; None for none.

    MergeKit's built-in names are refused: their text is MergeKit's (LGPL-3.0), not shipped here."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadMerge(f"chat_template is `auto` or a Jinja template, got {quoted(value)}")
    if value == "auto":
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value and value in BUILTIN_TEMPLATES:
        raise BadMerge(f"chat_template {value!r} is one of MergeKit's built-in templates, which mpstore does "
                       "not ship: give the template's Jinja text, or `auto` to take the inputs' own")
    if len(value) < 20 or "{" not in value:
        raise BadMerge(f"invalid chat_template {quoted(value)}: give `auto` or a Jinja template")
    return value


def parse_spec(tokenizer_source: object, tokenizer: object, index: Callable[[str], object]) -> dict | None:
    """The plan's `tokenizer` field from a YAML's `tokenizer_source` or `tokenizer:` block.

    `index` maps a model as the YAML names it to its input number, the position in the `inputs`
    that `build` will get (and raises BadMerge for a model that is not an input). Returns
    `{"source": "base" | "union" | int, "tokens": {token: {"source": ..., "force": bool}},
    "pad_to_multiple_of": int | None}`, a token's source being None, an input number,
    `{"kind": "zero"}` or `{"kind": "model_token", "model": int, "token_id": int | None,
    "token": str | None}`; None when neither key is given."""
    if tokenizer_source is not None and tokenizer is not None:
        raise BadMerge("give tokenizer_source or a tokenizer: block, not both")
    if tokenizer_source is not None:
        return {"source": _source(tokenizer_source, index, "tokenizer_source"), "tokens": {},
                "pad_to_multiple_of": None}
    if tokenizer is None:
        return None
    if not isinstance(tokenizer, dict) or set(tokenizer) - {"source", "tokens", "pad_to_multiple_of"}:
        raise BadMerge(f"tokenizer: is a mapping with source, tokens and pad_to_multiple_of, got {quoted(tokenizer)}")
    pad = tokenizer.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad <= 2**31):
        raise BadMerge(f"tokenizer.pad_to_multiple_of is a whole number >= 0, got {quoted(pad)}")
    tokens = tokenizer.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise BadMerge(f"tokenizer.tokens maps a token to {{source: ..., force: ...}}, got {quoted(tokens)}")
    out: dict[str, dict] = {}
    for tok, cfg in tokens.items():
        where = f"tokenizer.tokens[{quoted(tok)}]"
        if not isinstance(tok, str) or not tok:
            raise BadMerge(f"{where}: a token is non-empty text")
        cfg = {} if cfg is None else cfg
        if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
            raise BadMerge(f"{where} is a mapping with source and force, got {quoted(cfg)}")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise BadMerge(f"{where}.force is true or false, got {quoted(force)}")
        out[tok] = {"source": _token_source(cfg.get("source"), index, f"{where}.source"), "force": force}
    return {"source": _source(tokenizer.get("source", "union"), index, "tokenizer.source"), "tokens": out,
            "pad_to_multiple_of": pad or None}


def _source(value: object, index: Callable[[str], object], where: str) -> object:
    if value in ("base", "union"):
        assert isinstance(value, str)
        return value
    if not isinstance(value, str) or not value:
        raise BadMerge(f"{where} is base, union or an input model, got {quoted(value)}")
    return index(value)


def _token_source(value: object, index: Callable[[str], object], where: str) -> object:
    if value is None:
        return None
    if isinstance(value, str):
        return index(value)
    if isinstance(value, dict) and value.get("kind") == "zero" and set(value) == {"kind"}:
        return {"kind": "zero"}
    if isinstance(value, dict) and value.get("kind") == "model_token" and set(value) <= {"kind", "model", "token_id",
                                                                                        "token"}:
        token_id, token = value.get("token_id"), value.get("token")
        if (token_id is None) == (token is None):
            raise BadMerge(f"{where}: give one of token_id and token")
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int)):
            raise BadMerge(f"{where}.token_id is a whole number, got {quoted(token_id)}")
        if token is not None and not isinstance(token, str):
            raise BadMerge(f"{where}.token is text, got {quoted(token)}")
        model = value.get("model")
        if not isinstance(model, str):
            raise BadMerge(f"{where}.model is an input model, got {quoted(model)}")
        return {"kind": "model_token", "model": index(model), "token_id": token_id, "token": token}
    raise BadMerge(f"{where} is a model, {{kind: zero}} or {{kind: model_token, model: ..., token: ...}}, "
                   f"got {quoted(value)}")


def with_models(spec: Mapping, f: Callable[[object], object]) -> dict:
    """`spec` with every model it names replaced by `f(model)`: a request's refs become a plan's
    commit ids, a plan's commit ids become `build`'s input numbers."""
    tokens = {}
    for tok, cfg in spec["tokens"].items():
        src = cfg["source"]
        if isinstance(src, dict):
            src = {**src, "model": f(src["model"])} if "model" in src else src
        elif src is not None:
            src = f(src)
        tokens[tok] = {**cfg, "source": src}
    source = spec["source"]
    return {**spec, "source": source if source in ("base", "union") else f(source), "tokens": tokens}


# ------------------------------------------------------------------------------ reading a tokenizer


@dataclass
class _Tokenizer:
    """One input's tokenizer as transformers would load it (only what a merge needs)."""

    files: dict[str, bytes]  # its tokenizer files
    doc: dict  # tokenizer.json
    vocab: dict[str, int]  # token -> id, added tokens included (transformers' get_vocab())
    added: list[dict]  # tokenizer.json's added tokens, by id
    rows: int  # the embedding rows its config declares (vocab_size), else len(vocab)


def _json(files: Mapping[str, bytes], path: str, who: str) -> dict | None:
    raw = files.get(path)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadMerge(f"{who}: {path} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadMerge(f"{who}: {path} is not a JSON object")
    return doc


def _content(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: text, or an AddedToken's fields."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _vocab_size(files: Mapping[str, bytes], who: str) -> int | None:
    cfg = _json(files, "config.json", who) or {}
    size = cfg.get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def read_tokenizer(files: Mapping[str, bytes], who: str) -> _Tokenizer | None:
    """The input's tokenizer, None if it has none; BadMerge where transformers would see another
    vocabulary than its tokenizer.json holds (special or added tokens it would add) or where only
    a sentencepiece model (which this module does not parse) describes it."""
    doc = _json(files, "tokenizer.json", who)
    if doc is None:
        if "tokenizer.model" in files:
            raise BadMerge(f"{who} has only a sentencepiece tokenizer.model: mpstore needs its tokenizer.json "
                           "to build the merged vocabulary (save the tokenizer with transformers first)")
        return None
    model = doc.get("model")
    if not isinstance(model, dict) or not isinstance(doc.get("added_tokens", []), list):
        raise BadMerge(f"{who}: tokenizer.json has no model or malformed added_tokens")
    raw_vocab = model.get("vocab")
    vocab: dict[str, int] = {}
    if isinstance(raw_vocab, dict):
        vocab = {t: i for t, i in raw_vocab.items() if isinstance(i, int)}
    elif isinstance(raw_vocab, list):  # Unigram: [piece, score] in id order
        vocab = {p[0]: i for i, p in enumerate(raw_vocab) if isinstance(p, list) and p and isinstance(p[0], str)}
    if len(vocab) != len(raw_vocab or ()):
        raise BadMerge(f"{who}: tokenizer.json's model vocabulary is malformed")
    added = []
    for entry in doc.get("added_tokens", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not isinstance(entry.get("content"),
                                                                                                  str):
            raise BadMerge(f"{who}: tokenizer.json has a malformed added token {quoted(entry)}")
        added.append(entry)
        vocab[entry["content"]] = entry["id"]
    added.sort(key=lambda e: e["id"])
    config = _json(files, "tokenizer_config.json", who) or {}
    decoder = config.get("added_tokens_decoder") or {}
    for tid, entry in decoder.items() if isinstance(decoder, dict) else ():
        tok = _content(entry)
        if tok is None or vocab.get(tok) != _int(tid):
            raise BadMerge(f"{who}: tokenizer_config.json adds token {quoted(tok)} at id {tid}, which its "
                           "tokenizer.json does not have there")
    legacy = _json(files, "added_tokens.json", who) or {}
    for tok, tid in legacy.items():
        if vocab.get(tok) != tid:
            raise BadMerge(f"{who}: added_tokens.json adds token {quoted(tok)} at id {tid}, which its "
                           "tokenizer.json does not have there")
    for tok in _named_specials(files, who):
        if tok not in vocab:
            raise BadMerge(f"{who}: special token {quoted(tok)} is not in its tokenizer.json (transformers would "
                           "add it, changing the vocabulary)")
    tok_files = {p: b for p, b in files.items() if is_tokenizer_file(p)}
    return _Tokenizer(tok_files, doc, vocab, added, _vocab_size(files, who) or len(vocab))


def _named_specials(files: Mapping[str, bytes], who: str) -> set[str]:
    """The special tokens tokenizer_config.json and special_tokens_map.json name (transformers adds
    each to the vocabulary if it is not there)."""
    named: list[object] = []
    for path in ("tokenizer_config.json", "special_tokens_map.json"):
        source = _json(files, path, who) or {}
        named += [source.get(k) for k in SPECIAL_KEYS]
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = source.get(key)
            named += list(extra.values() if isinstance(extra, dict) else extra or [])
    return {t for t in map(_content, named) if t is not None}


def _int(text: object) -> int | None:
    try:
        return int(text)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _stripped(tok: _Tokenizer, who: str) -> _Tokenizer:
    """The tokenizer without tokens whose id is past the model's embedding rows, as MergeKit's
    `get_stripped_tokenizer` makes the base's: by content from the BPE vocabulary, from the added
    tokens by id, and every merge with a removed token as a part (BPE only, as in MergeKit). A merge
    that makes a removed token is kept by MergeKit, and the tokenizers library then refuses the
    file; such a cut is refused here, as is one that would remove a named special token."""
    unused = {t for t, i in tok.vocab.items() if i >= tok.rows}
    if not unused:
        return tok
    model = tok.doc["model"]
    if model.get("type") != "BPE":
        raise BadMerge(f"{who}'s tokenizer has {len(unused)} tokens past its {tok.rows} embedding rows and is of type "
                       f"{quoted(model.get('type'))}: only a BPE tokenizer can be cut to fit (as in MergeKit)")
    config = _json(tok.files, "tokenizer_config.json", who) or {}
    lost = sorted(_named_specials(tok.files, who) & unused)
    if lost:
        raise BadMerge(f"{who}: special token {quoted(lost[0])} lies past the model's {tok.rows} embedding rows")
    prefix = model.get("continuing_subword_prefix") or ""

    def keep(merge: object) -> bool:
        if isinstance(merge, str) and merge.count(" ") == 1:
            parts: Sequence[object] = merge.split(" ")
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) for p in merge):
            parts = merge
        else:
            raise BadMerge(f"{who}: tokenizer.json has a malformed merge {quoted(merge)}")
        if any(p in unused for p in parts):
            return False
        left, right = str(parts[0]), str(parts[1])
        made = left + (right[len(prefix):] if prefix and right.startswith(prefix) else right)
        if made in unused:
            raise BadMerge(f"{who}: token {quoted(made)} lies past the model's {tok.rows} embedding rows but a merge "
                           "makes it: the tokenizer cannot be cut to fit (MergeKit fails on it too)")
        return True

    doc = json.loads(json.dumps(tok.doc))
    doc["added_tokens"] = [e for e in doc.get("added_tokens", []) if e["id"] < tok.rows]
    doc["model"]["vocab"] = {t: i for t, i in model["vocab"].items() if t not in unused}
    doc["model"]["merges"] = [m for m in model.get("merges", []) if keep(m)]
    vocab = dict(doc["model"]["vocab"])
    vocab.update((e["content"], e["id"]) for e in doc["added_tokens"])
    added = [e for e in tok.added if e["id"] < tok.rows]
    files = dict(tok.files)
    files["tokenizer.json"] = _dump(doc)
    if isinstance(config.get("added_tokens_decoder"), dict):
        config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                          if (_int(k) or 0) < tok.rows}
        files["tokenizer_config.json"] = _dump(config, newline=True)
    for path in STALE_WHEN_CHANGED:
        files.pop(path, None)
    return _Tokenizer(files, doc, vocab, added, tok.rows)


def _dump(doc: dict, newline: bool = False) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + ("\n" if newline else "")).encode("utf-8")


# ------------------------------------------------------------------------------ the merged vocabulary


@dataclass(frozen=True)
class Fill:
    """The embedding MergeKit gives an output token that an input lacks (or that is forced):
    `zero`; `row` (one (input, row) of that input's own tensor); `mean` (the mean of the rows of
    every input that has it, summed in input order in the compute dtype)."""

    kind: str  # "zero" | "row" | "mean"
    sources: tuple[tuple[int, int], ...] = ()  # (input, row in that input's tensor)


@dataclass
class Vocabulary:
    """The merged tokenizer and how each input's vocabulary tensors map onto it.

    `files`: the tokenizer files of the merged commit (every `is_tokenizer_file` of the template
    is replaced by these). `size`: config.json's new vocab_size, None when it stays the template's.
    `rows[i]`: for each output token, input i's row, or -1 where input i lacks it; None where input
    i's tensors are already the output's (same tokens at the same rows, nothing padded or forced).
    `tokens`: output tokens before padding; `length`: the aligned tensors' rows (`tokens` rounded
    up to `pad_to_multiple_of`); `fills`: output token -> its default embedding, for every token
    some input lacks or that is forced; `forced`: tokens every input takes from `fills` even when
    it has them (`force: true`)."""

    files: dict[str, bytes]
    size: int | None
    rows: list[list[int] | None]
    tokens: int = 0
    length: int = 0
    fills: dict[int, Fill] = field(default_factory=dict)
    forced: frozenset[int] = frozenset()

    @property
    def changed(self) -> bool:
        """Whether any vocabulary tensor must be aligned (else they merge as they are)."""
        return any(r is not None for r in self.rows)


def build(inputs: Sequence[Mapping[str, bytes]], base: int | None, spec: Mapping | None,
          chat_template: str | None, names: Sequence[str] | None = None) -> Vocabulary:
    """The merged tokenizer, as MergeKit 0.1.5 builds it.

    `inputs[i]`: input i's non-tensor files (relative path -> bytes), in the order the method sums
    its inputs; `base`: the base's position among them (None: no base; the first input then
    provides the tokenizer, like the output's other files); `spec`: the plan's `tokenizer` field
    (`parse_spec`), None for neither `tokenizer_source` nor `tokenizer:`; `chat_template`: `auto`,
    Jinja text, or None; `names`: how messages call the inputs. Without a spec the vocabulary is
    the template's and only the chat template can change (MergeKit then copies the template's
    tokenizer files, set to the chat template)."""
    who = [names[i] if names else f"input {i + 1}" for i in range(len(inputs))]
    donor = base if base is not None else 0
    if spec is None:
        files = {p: b for p, b in inputs[donor].items() if is_tokenizer_file(p)}
        vocab = Vocabulary(files, None, [None] * len(inputs))
    else:
        vocab = _merged(inputs, base, spec, who)
    template = _chosen_template(inputs, donor, chat_template, who)
    if template is not None:
        if "tokenizer_config.json" not in vocab.files and "tokenizer.json" not in vocab.files:
            raise BadMerge(f"chat_template needs a tokenizer, and {who[donor]} has no tokenizer files")
        vocab.files = _with_template(vocab.files, template, who[donor])
    return vocab


def _merged(inputs: Sequence[Mapping[str, bytes]], base: int | None, spec: Mapping, who: list[str]) -> Vocabulary:
    donor = base if base is not None else 0
    read = [read_tokenizer(files, who[i]) for i, files in enumerate(inputs)]
    unstripped = read[donor]
    if unstripped is None:
        raise BadMerge(f"a tokenizer merge needs {who[donor]}'s tokenizer.json")
    first = _stripped(unstripped, who[donor])
    toks = [first if i == donor else t for i, t in enumerate(read)]
    # MergeKit takes an input without a tokenizer to share the base's, with its own embedding rows
    own = [t or replace(first, rows=_vocab_size(inputs[i], who[i]) or len(first.vocab)) for i, t in enumerate(toks)]
    source = spec.get("source", "union")
    if source == "base":
        out = first
        new: list[dict] = []
    elif source == "union":
        out, new = first, _union(toks, donor)
    elif isinstance(source, int) and not isinstance(source, bool) and 0 <= source < len(inputs):
        chosen = read[source]  # as the model has it: MergeKit cuts only the base's to fit
        if chosen is None:
            raise BadMerge(f"tokenizer source {who[source]} has no tokenizer.json")
        out, new = chosen, []
    else:
        raise BadMerge(f"tokenizer source {quoted(source)} is not base, union or an input")
    configured: Mapping[str, Mapping] = spec.get("tokens") or {}
    known = set(out.vocab) | {e["content"] for e in new}
    for tok in configured:
        if tok not in known:
            new.append(_regular(tok))
            known.add(tok)
    vocab = dict(out.vocab)
    for i, entry in enumerate(new):
        vocab[entry["content"]] = entry["id"] = len(out.vocab) + i
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise BadMerge("the merged tokenizer's token ids are not 0..n-1 without gaps: MergeKit could not place "
                       "every token's row")
    order = sorted(vocab, key=vocab.__getitem__)
    rows = []
    for i, t in enumerate(own):
        r = [t.vocab.get(tok, -1) for tok in order]
        past = [tok for tok, j in zip(order, r) if j >= t.rows]
        if past:
            raise BadMerge(f"{who[i]}'s tokenizer has token {quoted(past[0])} at id {t.vocab[past[0]]}, past its "
                           f"{t.rows} embedding rows (MergeKit fails on it too)")
        rows.append(r)
    pad = spec.get("pad_to_multiple_of")
    size = len(vocab) if not pad or len(vocab) % pad == 0 else (len(vocab) // pad + 1) * pad
    forced = frozenset(vocab[tok] for tok, cfg in configured.items() if cfg.get("force"))
    fills = _fills(vocab, rows, own, base, configured, who)
    plain = [None if r == list(range(t.rows)) and size == t.rows and not forced else r for r, t in zip(rows, own)]
    files = out.files if not new else _with_tokens(out, new)
    template_rows = _vocab_size(inputs[donor], who[donor])
    return Vocabulary(files, None if size == template_rows else size, plain, len(vocab), size, fills, forced)


def _regular(tok: str) -> dict:
    """A token MergeKit adds with transformers' `add_tokens(str)`: normalized, not special."""
    return {"id": -1, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": True, "special": False}


def _union(toks: list[_Tokenizer | None], donor: int) -> list[dict]:
    """The tokens MergeKit's union adds to the base's tokenizer: every ordinary token of an input
    (within its embedding rows) the base lacks, then every added token (first definition wins)."""
    order = [donor] + [i for i in range(len(toks)) if i != donor]
    present = [t for t in (toks[i] for i in order) if t is not None]
    added: dict[str, dict] = {}
    for t in present:
        for entry in t.added:
            if entry["id"] < t.rows:
                added.setdefault(entry["content"], entry)
    base_vocab = present[0].vocab
    regular: dict[str, dict] = {}
    for t in present:
        for tok in sorted(t.vocab, key=t.vocab.__getitem__):
            if t.vocab[tok] < t.rows and tok not in base_vocab and tok not in added:
                regular.setdefault(tok, _regular(tok))
    extra = [dict(e) for tok, e in added.items() if tok not in base_vocab]
    return [*regular.values(), *extra]


def _with_tokens(out: _Tokenizer, new: list[dict]) -> dict[str, bytes]:
    """`out`'s files with `new` appended to tokenizer.json's added tokens (and to
    tokenizer_config.json's added_tokens_decoder where it has one)."""
    doc = json.loads(json.dumps(out.doc))
    doc["added_tokens"] = [*doc.get("added_tokens", []), *new]
    files = {p: b for p, b in out.files.items() if p not in STALE_WHEN_CHANGED}
    files["tokenizer.json"] = _dump(doc)
    config = _json(out.files, "tokenizer_config.json", "the merged tokenizer")
    if config is not None and isinstance(config.get("added_tokens_decoder"), dict):
        for e in new:
            config["added_tokens_decoder"][str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
        files["tokenizer_config.json"] = _dump(config, newline=True)
    return files


def _fills(vocab: dict[str, int], rows: list[list[int]], own: list[_Tokenizer], base: int | None,
           configured: Mapping[str, Mapping], who: list[str]) -> dict[int, Fill]:
    """MergeKit's fill rule (`PermutedVocabulary`), for each token some input lacks or that is forced:
    a configured source if the config names one; else the one input that has it; zero if none
    has it; the base's row if the base has it; else the mean over the inputs that have it."""
    fills: dict[int, Fill] = {}
    for tok, tid in vocab.items():
        have = [i for i, r in enumerate(rows) if r[tid] >= 0]
        cfg = configured.get(tok)
        if len(have) == len(rows) and not (cfg and cfg.get("force")):
            continue
        if cfg is not None:
            fills[tid] = _configured(tok, tid, cfg.get("source"), rows, own, who)
        elif len(have) == 1:
            fills[tid] = Fill("row", ((have[0], rows[have[0]][tid]),))
        elif not have:
            fills[tid] = Fill("zero")
        elif base is not None and base in have:
            fills[tid] = Fill("row", ((base, rows[base][tid]),))
        else:
            fills[tid] = Fill("mean", tuple((i, rows[i][tid]) for i in have))
    return fills


def _configured(tok: str, tid: int, source: object, rows: list[list[int]], own: list[_Tokenizer],
                who: list[str]) -> Fill:
    where = f"tokenizer.tokens[{quoted(tok)}]"
    if isinstance(source, dict) and source.get("kind") == "zero":
        return Fill("zero")
    if isinstance(source, int) and not isinstance(source, bool) and 0 <= source < len(rows):
        if rows[source][tid] < 0:
            raise BadMerge(f"{where}: {who[source]} does not have the token")
        return Fill("row", ((source, rows[source][tid]),))
    if isinstance(source, dict) and source.get("kind") == "model_token":
        m = source.get("model")
        if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m < len(rows):
            raise BadMerge(f"{where}: model {quoted(m)} is not an input")
        row = source.get("token_id")
        if row is None:
            row = own[m].vocab.get(source.get("token"))  # type: ignore[arg-type]
            if row is None:
                raise BadMerge(f"{where}: {who[m]} has no token {quoted(source.get('token'))}")
        if not isinstance(row, int) or not 0 <= row < own[m].rows:
            raise BadMerge(f"{where}: token id {quoted(row)} is outside {who[m]}'s {own[m].rows} rows")
        return Fill("row", ((m, row),))
    raise BadMerge(f"{where} needs a source (a model, {{kind: zero}} or {{kind: model_token, ...}}): "
                   "some input lacks the token or it is forced")


# ------------------------------------------------------------------------------ chat template


def _templates(files: Mapping[str, bytes], who: str) -> str | dict | None:
    """An input's chat template as transformers loads it: chat_template.jinja (and named ones in
    additional_chat_templates/) before tokenizer_config.json's `chat_template`."""
    named = {p[len(TEMPLATE_DIR):].removesuffix(".jinja"): b for p, b in files.items()
             if p.startswith(TEMPLATE_DIR) and p.endswith(".jinja") and "/" not in p[len(TEMPLATE_DIR):]}
    if "chat_template.jinja" in files:
        named["default"] = files["chat_template.jinja"]
    if named:
        try:
            texts = {k: v.decode("utf-8") for k, v in named.items()}
        except UnicodeDecodeError:
            raise BadMerge(f"{who}: a chat template file is not UTF-8 text") from None
        return texts["default"] if set(texts) == {"default"} else texts
    value = (_json(files, "tokenizer_config.json", who) or {}).get("chat_template")
    if isinstance(value, list):
        return {e.get("name"): e.get("template") for e in value if isinstance(e, dict)}
    return value if isinstance(value, str) else None


def _chosen_template(inputs: Sequence[Mapping[str, bytes]], donor: int, chat_template: str | None,
                     who: list[str]) -> str | None:
    """The template to write: the text given, or for `auto` the template most inputs have
    (whitespace-stripped, as MergeKit compares them; a tie goes to the base, then input order)."""
    chat_template = check_chat_template(chat_template)
    if chat_template != "auto":
        return chat_template
    found = []
    for i in [donor] + [i for i in range(len(inputs)) if i != donor]:
        if "tokenizer.json" not in inputs[i] and "tokenizer_config.json" not in inputs[i]:
            continue  # MergeKit cannot load a tokenizer there and skips the input
        t = _templates(inputs[i], who[i])
        if isinstance(t, dict):
            t = t.get("default")
        if isinstance(t, str) and t:
            found.append(t.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def _with_template(files: dict[str, bytes], template: str, who: str) -> dict[str, bytes]:
    """The tokenizer files with `template` as their only chat template, where transformers 5 (and
    so MergeKit 0.1.5) saves it: chat_template.jinja, nothing in tokenizer_config.json."""
    out = {p: b for p, b in files.items() if not p.startswith(TEMPLATE_DIR)}
    out["chat_template.jinja"] = template.encode("utf-8")
    config = _json(out, "tokenizer_config.json", who)
    if config is not None and "chat_template" in config:
        del config["chat_template"]
        out["tokenizer_config.json"] = _dump(config, newline=True)
    return out


# ------------------------------------------------------------------------------ tensors


def align(tensors: Sequence[torch.Tensor], vocab: Vocabulary, axis: int = VOCAB_AXIS) -> list[torch.Tensor]:
    """Every input's vocabulary tensor in the merged vocabulary, exactly as MergeKit's
    `PermutedVocabulary` makes it: in the promoted dtype of the inputs (pass them in the compute
    dtype, as MergeKit's loader converts them to `dtype:` first); a token an input has is its row,
    bit for bit; one it lacks (or a forced one) gets its `Fill` — zeros, a row, or the mean
    `((0 + r1) + r2 ...) / count` computed in that dtype; padding rows past `tokens` get the mean of
    the input's own aligned rows (`torch.mean` over the vocabulary axis, in that dtype)."""
    import torch

    if len(tensors) != len(vocab.rows):
        raise BadMerge(f"{len(tensors)} vocabulary tensors for {len(vocab.rows)} inputs")
    views = [t.movedim(axis, 0) for t in tensors]
    shape = views[0].shape[1:]
    if any(v.shape[1:] != shape for v in views):
        raise BadMerge(f"vocabulary tensors differ beyond the vocabulary axis: {[list(t.shape) for t in tensors]}")
    for i, (v, rows) in enumerate(zip(views, vocab.rows)):
        if rows is not None and (len(rows) != vocab.tokens or (rows and max(rows) >= v.shape[0])):
            raise BadMerge(f"input {i + 1}'s vocabulary tensor has {v.shape[0]} rows, fewer than its tokenizer needs")
    dtype = views[0].dtype
    for v in views:
        dtype = torch.promote_types(dtype, v.dtype)
    defaults: dict[int, torch.Tensor] = {}
    for tid, fill in vocab.fills.items():
        if fill.kind == "zero":
            defaults[tid] = views[0].new_zeros(shape)
        elif fill.kind == "row":
            (m, row), = fill.sources
            defaults[tid] = _row(views, m, row)
        else:
            embed = torch.zeros(shape, dtype=dtype, device=views[0].device)
            for m, row in fill.sources:
                embed = embed + _row(views, m, row)
            embed /= len(fill.sources)
            defaults[tid] = embed
    out = []
    for i, (v, rows) in enumerate(zip(views, vocab.rows)):
        if rows is None:
            out.append(tensors[i].to(dtype))
            continue
        new = torch.zeros((vocab.length, *shape), dtype=dtype, device=v.device)
        index = torch.tensor(rows, dtype=torch.long, device=v.device)
        own = (index >= 0) & ~_mask(vocab.forced, vocab.tokens, v.device)
        new[:vocab.tokens][own] = v[index[own]].to(dtype)
        for tid in (~own).nonzero().flatten().tolist():
            new[tid] = defaults[tid]
        if vocab.length > vocab.tokens:
            new[vocab.tokens:] = torch.mean(new[:vocab.tokens], dim=0)
        out.append(new.movedim(0, axis))
    return out


def _row(views: Sequence[torch.Tensor], m: int, row: int) -> torch.Tensor:
    if not 0 <= row < views[m].shape[0]:
        raise BadMerge(f"input {m + 1}'s vocabulary tensor has no row {row}")
    return views[m][row]


def _mask(ids: frozenset[int], n: int, device: torch.device) -> torch.Tensor:
    import torch

    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if ids:
        mask[torch.tensor(sorted(ids), dtype=torch.long, device=device)] = True
    return mask
