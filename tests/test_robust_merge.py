"""Hostile merge requests: every parameter value, YAML document, seed, budget, memory limit and
thread count a user can write either merges or is refused with one line (an `MpError`; through
`mp`: `mp: error: ...`, exit 1) before any chunk is written, so the store keeps every key and
value it had. Non-finite numbers (NaN, ±inf, 1e999) and integers the plan cannot store are
refused wherever they appear; float8 models need a compute dtype; a NaN inside a stored delta is
not corruption (fsck stays clean and budgets still plan).

Each defect has a regression test named after it; the hypothesis tests at the end generate
parameter values, YAML documents, seeds and budgets (in process, through `Repo`), plus a few
through the real `mp` command for the exit status and the one-line message.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_user_error, run_mp, store_fingerprint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mpstore import Repo
from mpstore.errors import MpError
from mpstore.merge import catalog
from mpstore.merge.request import MergeRequest, from_yaml

CHUNK = 4096
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
TA = ["--method", "task_arithmetic", "--base", "base", "e1", "e2"]
MERGE = ["merge", *TA, "-b", "out"]
U64, I64 = 1 << 64, 1 << 63


def _fill(r: Repo, family: dict[str, Path]) -> None:
    r.add(family["base"], "base")
    r.add(family["expert-1"], "e1", base="base")
    r.add(family["expert-2"], "e2", base="base")


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, family) -> Path:
    """base, e1 and e2 (with their catalog against base), closed so `mp` owns it."""
    root = tmp_path_factory.mktemp("robust") / "repo"
    with Repo.init(root, chunk_size=CHUNK) as r:
        _fill(r, family)
    return root


@pytest.fixture(scope="module")
def api(tmp_path_factory, family):
    """The same models in a repository open in this process, for the in-process examples."""
    r = Repo.init(tmp_path_factory.mktemp("robust-api") / "repo", chunk_size=CHUNK)
    _fill(r, family)
    yield r
    r.close()


def refused_cli(root: Path, *args, fragments: tuple[str, ...] = ()) -> str:
    """`mp ARGS` exits 1 with one line and leaves every key and value of the store as it was."""
    before = store_fingerprint(root)
    line = assert_user_error(run_mp("-C", root, *args), *fragments)
    assert store_fingerprint(root) == before, "a refused command changed the store"
    return line


def refused_api(repo: Repo, request: MergeRequest | Path, *fragments: str, **kw) -> str:
    """`repo.merge` (the YAML read included) raises a one-line MpError and writes nothing."""
    before = store_fingerprint(repo)
    with pytest.raises(MpError) as err:
        repo.merge(from_yaml(request) if isinstance(request, Path) else request, "out", **kw)
    msg = str(err.value)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert store_fingerprint(repo) == before, "a refused merge changed the store"
    return msg


def ta(model_params: list[dict] | None = None, global_params: dict | None = None, **kw) -> MergeRequest:
    return MergeRequest("task_arithmetic", "base", ["e1", "e2"],
                        model_params if model_params is not None else [{"weight": 0.5}, {"weight": 0.5}],
                        global_params or {}, kw.pop("dtype", "F32"), None, **kw)


def write_yaml(where: Path, text: str | bytes, name: str = "merge.yml") -> Path:
    path = where / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ------------------------------------------------------------------------------ 1. non-finite values

NONFINITE_FLAGS = {
    "weight-nan": [*MERGE, "--weight", "nan"],
    "weight-inf-per-model": [*MERGE, "--weight", "inf,1"],
    "weight-json-NaN": [*MERGE, "--weight", "NaN"],
    "weight-1e999": [*MERGE, "--weight", "1e999"],
    "weight-gradient": [*MERGE, "--weight", "[0.5, -Infinity]"],
    "weight-filtered": [*MERGE, "--weight", '[{"filter": "mlp", "value": NaN}, {"value": 1}]'],
    "lambda-nan": [*MERGE, "--weight", "1", "--lambda", "nan"],
    "param-lambda-inf": [*MERGE, "--weight", "1", "--param", "lambda=inf"],
    "slerp-t-nan": ["merge", "--method", "slerp", "--base", "base", "e1", "--t", "nan", "-b", "out"],
}


@pytest.mark.parametrize("args", NONFINITE_FLAGS.values(), ids=NONFINITE_FLAGS.keys())
def test_nan_weight_is_refused_before_anything_is_written(cli_store, args):
    refused_cli(cli_store, *args, fragments=("not a finite number",))


NONFINITE_YAML = {
    "global": "parameters: {lambda: .nan}",
    "per-model": None,  # weight .inf on models[0]
    "gradient": "parameters: {lambda: [1.0, -.inf]}",
    "filtered": "parameters: {lambda: [{filter: mlp, value: .NaN}, {value: 1.0}]}",
    "filtered-single": "parameters: {lambda: {filter: mlp, value: .Inf}}",
    "string-inf": "parameters: {lambda: inf}",
    "string-1e999": "parameters: {lambda: 1e999}",
    "float-1e999": "parameters: {lambda: 1.0e+999}",
}


def ta_yaml(extra: str = "", w1: str = "0.5") -> str:
    return ("merge_method: task_arithmetic\nbase_model: base\ndtype: float32\n"
            f"models:\n  - model: e1\n    parameters: {{weight: {w1}}}\n"
            f"  - model: e2\n    parameters: {{weight: 0.5}}\n{extra}\n")


@pytest.mark.parametrize("extra", NONFINITE_YAML.values(), ids=NONFINITE_YAML.keys())
def test_nonfinite_yaml_parameter_is_refused_before_anything_is_written(api, tmp_path, extra):
    text = ta_yaml(w1=".inf") if extra is None else ta_yaml(extra)
    refused_api(api, write_yaml(tmp_path, text), "not a finite number")


NAN, INF = math.nan, math.inf
NONFINITE_API = {
    "per-model": ([{"weight": NAN}, {"weight": 1.0}], {}),
    "global": (None, {"lambda": INF}),
    "gradient": ([{"weight": [0.0, -INF]}, {"weight": 1.0}], {}),
    "filtered": ([{"weight": [{"filter": "mlp", "value": NAN}, {"value": 1.0}]}, {"weight": 1.0}], {}),
    "nested-filter": ([{"weight": {"filter": "mlp", "value": {"filter": "up", "value": INF}}}, {"weight": 1}], {}),
    "string": (None, {"lambda": "-Infinity"}),
}


@pytest.mark.parametrize("mp_,gp", NONFINITE_API.values(), ids=NONFINITE_API.keys())
def test_nonfinite_parameter_is_refused_through_the_python_api(api, mp_, gp):
    refused_api(api, ta(mp_, gp), "not a finite number")
    with pytest.raises(MpError, match="not a finite number"):
        api.plan(ta(mp_, gp))


# ------------------------------------------------------------------------------ 2. huge integers, sizes


@pytest.mark.parametrize("seed", ["99999999999999999999999", str(U64), str(-I64 - 1)])
def test_huge_seed_is_refused_before_anything_is_written(cli_store, seed):
    refused_cli(cli_store, *MERGE, "--weight", "0.5", "--seed", seed, fragments=("seed",))


def test_seeds_that_fit_the_plan_are_accepted(api):
    for seed in (0, -1, -I64, U64 - 1):
        res = api.merge(MergeRequest("dare_ties", "base", ["e1", "e2"], [{"weight": 0.5, "density": 0.5}] * 2,
                                     {}, "F32", None, seed), "seeded")
        assert res.plan.seed == seed
    refused_api(api, ta(seed=True), "seed")  # a bool is not a seed
    refused_api(api, ta(seed=1.5), "seed")


def test_huge_budget_is_refused_before_anything_is_written(cli_store, api):
    refused_cli(cli_store, *MERGE, "--weight", "0.5", "--budget", "99999999999999999999999T",
                fragments=("budget", "too large"))
    for budget in (str(U64), "9" * 5000, "9" * 5000 + ".5GiB", "8388608T", "9" * 5000 + "%"):
        refused_api(api, ta(), "budget", budget=budget)
    assert api.plan(ta(), budget="8388607T").budget["bytes"] == 8388607 << 40  # the largest size there is


@pytest.mark.parametrize("limit", ["99999999999999999999999T", "9" * 5000, "0"])
def test_huge_memory_limit_is_refused_before_anything_is_written(cli_store, limit):
    refused_cli(cli_store, *MERGE, "--weight", "0.5", "--memory-limit", limit, fragments=("--memory-limit",))


def test_huge_yaml_weight_is_refused_before_anything_is_written(api, cli_store, tmp_path):
    big = write_yaml(tmp_path, ta_yaml(w1="99999999999999999999999999"), "big.yml")
    refused_cli(cli_store, "merge", "--config", big, "-b", "out", fragments=("weight", "too large"))
    for w in ("99999999999999999999999999", "1e999", "1.0e+999", str(-I64 - 1)):
        refused_api(api, write_yaml(tmp_path, ta_yaml(w1=w)), "weight")
    refused_api(api, ta([{"weight": 10 ** 400}, {"weight": 1}]), "weight")
    refused_api(api, ta([{"weight": [0, U64]}, {"weight": 1}]), "weight")
    refused_api(api, ta(), memory_limit=-1)


# ------------------------------------------------------------------------------ 3. YAML types

BAD_YAML = {
    "parameters-list": ta_yaml("parameters: [1, 2]"),
    "parameters-word": ta_yaml("parameters: abc"),
    "model-parameters-list": ta_yaml().replace("{weight: 0.5}", "[0.5]", 1),
    "models-number": "merge_method: ties\nbase_model: base\nmodels: 5\n",
    "models-word": "merge_method: ties\nbase_model: base\nmodels: e1\n",
    "models-mapping": "merge_method: ties\nbase_model: base\nmodels: {model: e1}\n",
    "model-number": ta_yaml().replace("model: e1", "model: 12345678"),
    "model-list": ta_yaml().replace("model: e1", "model: [e1]"),
    "model-mapping": ta_yaml().replace("model: e1", "model: {path: e1}"),
    "model-null": ta_yaml().replace("model: e1", "model: null"),
    "base-list": ta_yaml().replace("base_model: base", "base_model: [base]"),
    "method-number": ta_yaml().replace("merge_method: task_arithmetic", "merge_method: 5"),
    "method-list": ta_yaml().replace("merge_method: task_arithmetic", "merge_method: [ties]"),
    "dtype-number": ta_yaml().replace("dtype: float32", "dtype: 32"),
    "dtype-list": ta_yaml().replace("dtype: float32", "dtype: [float32]"),
    "out-dtype-bool": ta_yaml("out_dtype: true"),
    "filter-number": ta_yaml("parameters: {lambda: [{filter: 5, value: 1.0}]}"),
    "filter-list": ta_yaml("parameters: {lambda: [{filter: [mlp], value: 1.0}]}"),
    "date-value": ta_yaml("parameters: {lambda: 2024-01-01}"),
    "deeply-nested": ta_yaml("parameters: {lambda: " + "[" * 5000 + "]" * 5000 + "}"),
    "deep-filters": ta_yaml("parameters: {lambda: " + "{filter: a, value: " * 200 + "1" + "}" * 200 + "}"),
    "key-not-a-string": ta_yaml("parameters: {1: 2}"),
    "key-unhashable": ta_yaml("parameters: {[1]: 2}"),
    "non-utf8": ta_yaml().encode().replace(b"base_model: base", b"base_model: b\xffse"),
    "nul-byte": ta_yaml().replace("model: e1", "model: e\x001"),
}


@pytest.mark.parametrize("text", BAD_YAML.values(), ids=BAD_YAML.keys())
def test_malformed_yaml_types_are_refused_in_one_line(api, tmp_path, text):
    refused_api(api, write_yaml(tmp_path, text))


@pytest.mark.parametrize("key,fragments", [("non-utf8", ("UTF-8",)), ("parameters-list", ("parameters", "mapping")),
                                           ("model-number", ("models[0]", "quote"))])
def test_malformed_yaml_through_the_cli_is_one_line(cli_store, tmp_path, key, fragments):
    refused_cli(cli_store, "merge", "--config", write_yaml(tmp_path, BAD_YAML[key]), "-b", "out", fragments=fragments)


def test_malformed_request_through_the_python_api_is_refused(api):
    refused_api(api, MergeRequest(["ties"], "base", ["e1"]))  # type: ignore[arg-type]
    refused_api(api, MergeRequest("task_arithmetic", 5, ["e1"]))  # type: ignore[arg-type]
    refused_api(api, MergeRequest("task_arithmetic", "base", "e1"))  # type: ignore[arg-type]
    refused_api(api, MergeRequest("task_arithmetic", "base", ["e1", 2]))  # type: ignore[list-item]
    refused_api(api, ta([{"weight": 1.0}]), "2 models")  # parameters for one of two models
    refused_api(api, ta([{"weight": 1.0}, [1]]))  # type: ignore[list-item]
    refused_api(api, ta(global_params=[("lambda", 1)]))  # type: ignore[arg-type]
    refused_api(api, ta(dtype="F8_E4M3"), "dtype")
    refused_api(api, ta(dtype="float32"), "dtype")  # the API takes safetensors names: F32


@pytest.fixture(scope="module")
def f8_store(tmp_path_factory, family) -> Path:
    """base and expert-1 stored as F8_E4M3 (f8b, f8e) and as F8_E5M2 (f5b, f5e)."""
    top = tmp_path_factory.mktemp("f8")
    root = top / "repo"
    with Repo.init(root, chunk_size=CHUNK) as r:
        for tag, dt in (("f8", torch.float8_e4m3fn), ("f5", torch.float8_e5m2)):
            for src, name in (("base", "b"), ("expert-1", "e")):
                dst = top / f"{tag}-{src}"
                shutil.copytree(family[src], dst)
                weights = load_file(str(dst / "model.safetensors"))
                save_file({k: v.to(dt) for k, v in weights.items()}, str(dst / "model.safetensors"))
                r.add(dst, tag + name, base=f"{tag}b" if name == "e" else None)
    return root


def f8_yaml(tag: str, dtype: str = "") -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {tag}b\n{dtype}\n"
            f"models:\n  - model: {tag}e\n    parameters: {{weight: 0.5}}\n")


def test_f8_merge_without_dtype_is_refused_with_a_hint(f8_store, tmp_path):
    refused_cli(f8_store, "merge", "--config", write_yaml(tmp_path, f8_yaml("f8")), "-b", "out",
                fragments=("F8_E4M3", "dtype: float32"))
    with Repo.open(f8_store) as r:
        for tag in ("f8", "f5"):
            no_dtype = write_yaml(tmp_path, f8_yaml(tag), f"{tag}.yml")
            refused_api(r, no_dtype, "F8_E", "float8 arithmetic", "dtype: float32")
            with pytest.raises(MpError, match="dtype"):
                r.plan(from_yaml(no_dtype))
            # with a compute dtype they merge (the CLI's default is float32)
            res = r.merge(from_yaml(write_yaml(tmp_path, f8_yaml(tag, "dtype: float32"))), f"{tag}-yaml")
            assert res.plan.compute_dtype == "F32" and r.replay(f"{tag}-yaml").identical
            r.merge(MergeRequest("task_arithmetic", f"{tag}b", [f"{tag}e"], [{"weight": 0.5}], {}, "BF16", None),
                    f"{tag}-bf16")


# ------------------------------------------------------------------------------ 4. threads


@pytest.mark.parametrize("args", [[*MERGE, "--threads", "-1"], [*MERGE, "--threads", "0"],
                                  ["plan", *TA, "--threads", "-1"], [*MERGE, "--threads", str(U64)]],
                         ids=["merge-minus-1", "merge-0", "plan-minus-1", "merge-huge"])
def test_nonpositive_threads_are_refused_in_one_line(cli_store, args):
    refused_cli(cli_store, *args, "--weight", "0.5", fragments=("--threads",))


def test_threads_check_is_importable_for_every_front_door():
    from mpstore.merge.request import check_threads

    for bad in (-1, 0, 1 << 20, True, 1.5, "2"):
        with pytest.raises(MpError, match="threads"):
            check_threads(bad)  # type: ignore[arg-type]
    assert check_threads(None) is None and check_threads(3) == 3


# ------------------------------------------------------------------------------ 5. NaN in a stored delta


@pytest.fixture(scope="module")
def nan_store(tmp_path_factory, family) -> Path:
    """base, plus an expert whose delta holds NaN (both signs) and one whose delta holds +inf."""
    top = tmp_path_factory.mktemp("nan")
    root = top / "repo"
    with Repo.init(root, chunk_size=CHUNK) as r:
        r.add(family["base"], "base")
        for name, values in (("xnan", (NAN, -NAN)), ("xinf", (INF,))):
            dst = top / name
            shutil.copytree(family["expert-1"], dst)
            weights = load_file(str(dst / "model.safetensors"))
            for k in sorted(weights)[2:5]:
                flat = weights[k].clone().view(-1)
                for i, v in enumerate(values):
                    flat[7 * i + 3] = v
                weights[k] = flat.view(weights[k].shape)
            save_file(weights, str(dst / "model.safetensors"))
            r.add(dst, name, base="base")
    return root


def test_fsck_is_clean_when_an_expert_delta_holds_nan_or_inf(nan_store):
    with Repo.open(nan_store) as r, r.store.read() as txn:
        entries = list(txn.catalog_entries())
        nonfinite = [catalog.DeltaStats.decode(v, k) for k, v in entries]
        assert any(math.isnan(s.l2) for s in nonfinite) and any(math.isinf(s.l2) for s in nonfinite)
        assert all(catalog.verify(txn, k, v) is None for k, v in entries)
    proc = run_mp("-C", nan_store, "fsck")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with Repo.open(nan_store) as r:
        r.gc()
        assert r.fsck().problems == []  # after gc too: a false alarm would have survived it
        req = MergeRequest("task_arithmetic", "base", ["xnan", "xinf"], [{"weight": 0.5}] * 2, {}, "F32", None)
        res = r.merge(req, "budgeted", budget="50%")
        assert res.realized["chunks_omitted"] > 0
        bound = res.plan.estimate["bound"]
        assert bound is not None and not math.isnan(bound)  # an omitted NaN delta: no finite bound, not NaN
        assert r.fsck().problems == []


# ------------------------------------------------------------------------------ 6. generated input

huge_ints = st.sampled_from([I64 - 1, I64, U64 - 1, U64, -I64, -I64 - 1, 10 ** 30, -(10 ** 400)])
numbers = st.one_of(st.floats(), st.floats(allow_nan=False, allow_infinity=False, min_value=-4, max_value=4),
                    st.integers(-3, 3), st.integers(-(1 << 70), 1 << 70), huge_ints)
words = st.one_of(st.text(max_size=6), st.sampled_from(["nan", "-inf", "Infinity", "1e999", "0.5", "true", "off",
                                                        "9" * 400, "1e308", " 2 "]))
scalars = st.one_of(numbers, words, st.booleans(), st.none())
filters = st.one_of(st.sampled_from(["mlp", "*", "layers.1.", "norm", ""]), st.none(), st.integers(), st.text(max_size=4))
param_values = st.one_of(numbers, words, st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.fixed_dictionaries({"filter": filters, "value": kids}),
                           st.lists(st.fixed_dictionaries({"filter": filters, "value": kids}), max_size=3),
                           st.dictionaries(st.sampled_from(["filter", "value", "x"]), kids, max_size=2)),
    max_leaves=6))  # plain numbers and words often: nested values are mostly refused for their shape
param_names = st.sampled_from(["weight", "weight", "lambda", "normalize", "density", "bogus"])


def _leaves(spec: object):
    if isinstance(spec, dict):
        for v in spec.values():
            yield from _leaves(v)
    elif isinstance(spec, (list, tuple)):
        for v in spec:
            yield from _leaves(v)
    else:
        yield spec


def outcome(repo: Repo, make, branch: str = "fuzz", **kw):
    """Run a merge built by `make()`; an error must be one line and leave the store as it was.
    Returns the MergeResult, or None when refused."""
    before = store_fingerprint(repo)
    try:
        return repo.merge(make(), branch, **kw)
    except MpError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        assert store_fingerprint(repo) == before, f"refused ({msg}) but the store changed"
        return None


def plan_is_sane(plan) -> None:
    """What a merge accepted: every number in the stored plan is finite and storable."""
    for chain in [*plan.model_params, plan.global_params]:
        for levels in chain.values():
            for leaf in _leaves(levels):
                if isinstance(leaf, float):
                    assert math.isfinite(leaf), plan
                elif isinstance(leaf, int):
                    assert -I64 <= leaf < U64, plan
                elif isinstance(leaf, str):
                    try:
                        assert math.isfinite(float(leaf)), leaf
                    except ValueError:
                        pass
    assert -I64 <= plan.seed < U64


@FUZZ
@given(weights=st.lists(param_values, min_size=2, max_size=2),
       extra=st.lists(st.dictionaries(param_names, param_values, max_size=1), min_size=2, max_size=2),
       global_=st.dictionaries(param_names, param_values, max_size=2), dtype=st.sampled_from(["F32", "BF16", None]))
def test_generated_parameter_values_merge_or_are_refused_cleanly(api, weights, extra, global_, dtype):
    per_model = [{"weight": w, **x} for w, x in zip(weights, extra)]
    res = outcome(api, lambda: MergeRequest("task_arithmetic", "base", ["e1", "e2"], per_model, global_, dtype, None))
    if res is not None:
        plan_is_sane(res.plan)


yaml_scalars = st.one_of(numbers, words, st.booleans(), st.none(), st.dates())
yaml_values = st.recursive(yaml_scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.one_of(st.text(max_size=5), st.sampled_from(["filter", "value", "model"])),
                                             kids, max_size=3), max_leaves=6)


@st.composite
def yaml_documents(draw) -> bytes:
    """A valid task_arithmetic config with up to two things replaced by generated values,
    dumped by PyYAML (which writes .nan, .inf and big integers), sometimes with a byte spliced in."""
    doc: dict = {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
                 "models": [{"model": "e1", "parameters": {"weight": 0.5}}, {"model": "e2", "parameters": {"weight": 0.5}}],
                 "parameters": {"lambda": 1.0}}
    value = yaml_values
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from(["model-param", "param", "param", "model-param", "top", "model", "model-params",
                                      "drop", "extra", "doc"]))
        i = draw(st.integers(0, 1))
        models = doc.get("models") if isinstance(doc, dict) else None
        entry = models[i] if isinstance(models, list) and len(models) > i and isinstance(models[i], dict) else None
        if where == "top" and isinstance(doc, dict):
            doc[draw(st.sampled_from(sorted(doc) or ["models"]))] = draw(value)
        elif where == "model" and entry is not None:
            entry["model"] = draw(value)
        elif where == "model-params" and entry is not None:
            entry["parameters"] = draw(value)
        elif where == "model-param" and entry is not None and isinstance(entry.get("parameters"), dict):
            entry["parameters"][draw(param_names)] = draw(param_values | value)
        elif where == "param" and isinstance(doc, dict) and isinstance(doc.get("parameters"), dict):
            doc["parameters"][draw(param_names)] = draw(param_values | value)
        elif where == "drop" and isinstance(doc, dict) and doc:
            del doc[draw(st.sampled_from(sorted(doc)))]
        elif where == "extra" and isinstance(doc, dict):
            doc[draw(st.sampled_from(["slices", "tokenizer_source", "out_dtype", "x"]))] = draw(value)
        elif where == "doc":
            doc = draw(value)
    raw = yaml.safe_dump(doc, allow_unicode=draw(st.booleans())).encode()
    if draw(st.integers(0, 7)) == 7:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\x80", b"\xc3(", b"\x00", b"\t", b"{", b"&a", b"*b", b"!!python/int 1"])) + raw[at:]
    return raw


@FUZZ
@given(raw=yaml_documents())
def test_generated_yaml_documents_merge_or_are_refused_cleanly(api, tmp_path, raw):
    path = write_yaml(tmp_path, raw)
    res = outcome(api, lambda: from_yaml(path))
    if res is not None:
        plan_is_sane(res.plan)


budgets = st.one_of(
    st.none(),
    st.builds("{}{}".format, st.integers(0, 10 ** 30), st.sampled_from(["", "B", "k", "KiB", "MB", "g", "GiB", "T", "%"])),
    st.builds("{}%".format, st.floats()),
    st.text(max_size=8),
    st.sampled_from(["9" * 5000, "9" * 5000 + "%", "1e400%", "-1", " 10 % ", "0.5T", "0", "100%", "18446744073709551616"]))
seeds = st.one_of(st.integers(-(1 << 70), 1 << 70), huge_ints, st.integers(-3, 3))
memory_limits = st.one_of(st.just(1 << 30), st.integers(-3, 1 << 70), huge_ints)


@FUZZ
@given(seed=seeds, budget=budgets, memory_limit=memory_limits, method=st.sampled_from(["task_arithmetic", "dare_ties"]))
def test_generated_seeds_and_budgets_merge_or_are_refused_cleanly(api, seed, budget, memory_limit, method):
    res = outcome(api, lambda: MergeRequest(method, "base", ["e1", "e2"], [{"weight": 0.5, "density": 0.5}] * 2,
                                            {}, "F32", None, seed),
                  budget=budget, memory_limit=memory_limit)
    if res is not None:
        plan_is_sane(res.plan)
        assert res.plan.seed == seed
        if res.plan.budget is not None:
            assert 0 <= res.plan.budget["bytes"] < I64


cli_bad = st.one_of(
    st.tuples(st.just("--weight"), st.sampled_from(["nan", "inf", "-inf", "NaN", "1e999", "[0, NaN]", "1,Infinity",
                                                     "99999999999999999999999"])),
    st.tuples(st.just("--lambda"), st.sampled_from(["nan", "inf", "-inf"])),
    st.tuples(st.just("--seed"), st.integers(U64, 1 << 80).map(str) | st.integers(-(1 << 80), -I64 - 1).map(str)),
    st.tuples(st.just("--budget"), st.integers(U64, 1 << 200).map(str) | st.sampled_from(["9" * 5000 + "T"])),
    st.tuples(st.just("--threads"), st.integers(-(1 << 70), 0).map(str)),
    st.tuples(st.just("--memory-limit"), st.sampled_from(["0", "9" * 5000, "99999999999999999999999T"])),
)


@settings(FUZZ, max_examples=5)
@given(bad=cli_bad, verb=st.sampled_from(["merge", "plan"]))
def test_generated_bad_flags_through_the_cli_get_one_line_and_exit_1(cli_store, bad, verb):
    args = [verb, *TA, *(["-b", "out"] if verb == "merge" else [])]
    if bad[0] != "--weight":
        args += ["--weight", "0.5"]
    refused_cli(cli_store, *args, *bad)


# ------------------------------------------------------------------------------ the Python API's threads, weight sums


@pytest.mark.parametrize("threads", [-1, 0, 10**6])
def test_nonpositive_threads_are_refused_by_every_verb_of_the_python_api(api, threads):
    """`repo.merge/replay/analyze(threads=-1)` ended in ThreadPoolExecutor's ValueError."""
    refused_api(api, ta(), "--threads", threads=threads)
    api.merge(ta(), "for-replay")
    before = store_fingerprint(api)
    with pytest.raises(MpError, match="--threads"):
        api.replay("for-replay", threads=threads)
    with pytest.raises(MpError, match="--threads"):
        api.analyze("e1", "base", threads=threads)
    assert store_fingerprint(api) == before


def test_finite_weights_whose_sum_overflows_are_refused(api):
    """Each weight finite, their sum inf: normalize would divide every delta by inf."""
    huge = [{"weight": 1e308}, {"weight": 1e308}]
    refused_api(api, MergeRequest("ties", "base", ["e1", "e2"], huge, {"density": 0.5}, "F32", None),
                "weights sum to inf")
    refused_api(api, MergeRequest("linear", None, ["e1", "e2"], huge, {}, "F32", None), "weights sum to inf")
