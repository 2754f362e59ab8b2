"""What every MergeKit differential test shares: where the oracle lives, when a test without it
skips or fails, how a MergeKit YAML mapping is written, how the driver runs, and how two outputs
are compared.

MergeKit 0.1.5 lives in its own virtualenv, `.venv-mergekit` (`make mergekit-venv`), and runs as
a subprocess (tests/mergekit_driver.py, one process for every config of a test module) while
mpstore merges the same configs in the test's process; mpstore never imports MergeKit.

Not a test module (pytest does not collect it) and importing it never skips the importer: a
module decides with `require_mergekit` whether it needs the oracle at all, or only in its
MergeKit fixtures. It must never import a test module, so no module's skip reaches another.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parent
MK_VENV = TESTS.parent / ".venv-mergekit"
MK_PYTHON = MK_VENV / "bin" / "python"
MK_INSTALLED = MK_VENV / "bin" / "mergekit-yaml"  # written by pip once mergekit is installed
DRIVER = TESTS / "mergekit_driver.py"
MERGEKIT_VERSION = "0.1.5"
CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")  # as the Makefile reads it
B, E1, E2, E3 = "base", "expert-1", "expert-2", "expert-3"  # make_family's keys: E1 dense, E2 partial, E3 lora


def require_mergekit(*, module: bool = False) -> None:
    """Skip without the MergeKit venv, so a checkout without it still tests the rest; under CI,
    which always builds the venv, its absence is a failure instead.

    `module=True`, called at a test module's top level, skips the whole module, and under CI lets
    it be collected: its MergeKit fixtures (`running` calls this) then fail every test that needs
    the oracle, without stopping the session's collection."""
    if MK_INSTALLED.exists():
        return
    if not CI:
        pytest.skip(f"MergeKit oracle not installed: {MK_INSTALLED} not found (build it with "
                    f"`make mergekit-venv`; CI builds it in `make test`)", allow_module_level=module)
    if not module:
        pytest.fail(f"CI is set but the MergeKit oracle is missing: {MK_INSTALLED} not found. "
                    f"`make test` builds it with `make mergekit-venv` when CI is set.")


def config_doc(method: str, models: list | tuple, where: dict[str, str], base: str | None = None,
               parameters: dict | None = None, dtype: str | None = None, out_dtype: str | None = None,
               **extra: object) -> dict:
    """A MergeKit YAML mapping, keys in MergeKit's documented order. `models` is
    [(model key, parameters or None)]; `where` maps each key to what the tool is given for it (a
    folder for MergeKit, a ref for mpstore), so both tools read the same config. Empty parameters,
    and a dtype or out_dtype of None, are left out (MergeKit's defaults); `extra` (tokenizer keys,
    chat_template, ...) comes last, as given."""
    d: dict = {"merge_method": method}
    if base is not None:
        d["base_model"] = where[base]
    d["models"] = [{"model": where[m], **({"parameters": p} if p else {})} for m, p in models]
    if parameters:
        d["parameters"] = parameters
    if dtype is not None:
        d["dtype"] = dtype
    if out_dtype is not None:
        d["out_dtype"] = out_dtype
    return d | extra


@dataclass
class Driver:
    """One test module's MergeKit driver process, started by `running`."""

    process: subprocess.Popen
    root: Path  # holds jobs.json, result.json and mergekit.log
    out: dict[str, Path]  # job name -> the folder MergeKit writes its merge to

    def finish(self, timeout: float = 600) -> dict:
        """Wait for the driver and return its RESULT.json ({"mergekit", "torch", "jobs": {name:
        {"seconds", "error"}}}); a driver that crashed fails the caller with the tail of its log.
        A job MergeKit refused is not a crash: its "error" says why."""
        self.process.wait(timeout=timeout)
        log = self.root / "mergekit.log"
        assert self.process.returncode == 0, f"MergeKit driver failed:\n{log.read_text()[-4000:]}"
        return json.loads((self.root / "result.json").read_text())


@contextmanager
def running(jobs: list[dict], root: Path) -> Iterator[Driver]:
    """MergeKit working through `jobs` (the driver's JOBS.json entries) in the background, so that
    the caller's mpstore merges run meanwhile; `Driver.finish` collects it. Without the MergeKit
    venv the caller is skipped or failed first (`require_mergekit`). The driver's output goes to
    root/mergekit.log; however the block ends, the driver does not outlive it."""
    require_mergekit()
    (root / "jobs.json").write_text(json.dumps(jobs, indent=1))
    # the MergeKit venv's own interpreter: nothing of this venv may leak into it
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(root / "mergekit.log", "w") as log:
        proc = subprocess.Popen([str(MK_PYTHON), str(DRIVER), str(root / "jobs.json"), str(root / "result.json")],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Driver(proc, root, {j["name"]: Path(j["out"]) for j in jobs})
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two 16-bit float tensors (bfloat16 or float16,
    both of the same dtype): 0 = bit-equal, and +0 and -0 are equal."""
    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def layer_t(name: str, layers: int) -> float:
    """The layer position MergeKit evaluates gradients at (docs/merge_methods.md §7.2)."""
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) / (layers - 1) if layers > 1 else 1.0
    return 0.0


def evaluate(spec: Any, name: str, layers: int) -> Any:
    """A parameter value for one tensor (scalar, gradient or filter list), or None if silent."""
    if spec is None:
        return None
    if isinstance(spec, dict) or (isinstance(spec, list) and spec and isinstance(spec[0], dict)):
        for entry in spec if isinstance(spec, list) else [spec]:
            f = entry.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate(entry["value"], name, layers)
        return None
    if isinstance(spec, list):
        x = layer_t(name, layers) * (len(spec) - 1)
        i = math.floor(x)
        j = min(i + 1, len(spec) - 1)
        return (1 - (x - i)) * spec[i] + (x - i) * spec[j]
    return spec


def param(levels: Iterable[dict | None], key: str, name: str, layers: int, default: Any = None) -> Any:
    """Parameter `key` for tensor `name` of a model with `layers` layers, as MergeKit resolves it:
    from the first of `levels` (a model's parameters, then the global ones) that gives a value,
    else `default`. The tests work out with it, independently of mpstore, what MergeKit applied."""
    for level in levels:
        v = evaluate((level or {}).get(key), name, layers)
        if v is not None:
            return v
    return default
