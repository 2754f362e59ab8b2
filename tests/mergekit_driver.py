"""Run several MergeKit merges in one process: the oracle of the tests/test_mergekit_*.py modules
(started through tests/mergekit_oracle.py).

Test-only helper, executed with the interpreter of the separate `.venv-mergekit` virtualenv
(`make mergekit-venv`); mpstore itself never imports MergeKit. One process for every config
saves MergeKit's ~5 s import per `mergekit-yaml` call. For each job it does what
`mergekit-yaml CFG OUT --no-copy-tokenizer --no-write-model-card --quiet [--random-seed N]`
does, through the same `run_merge` entry point.

Usage: python mergekit_driver.py JOBS.json RESULT.json
JOBS.json is a list of {"name", "config" (a YAML path), "out" (a folder), "seed" (int or null),
and optionally "options": more MergeOptions fields, e.g. lora_merge_cache, lora_merge_dtype, or
copy_tokenizer: true (what `mergekit-yaml` does without --no-copy-tokenizer)}.
RESULT.json gets {"mergekit": version, "torch": version, "jobs": {name: {"seconds", "error"}}}.
A job that fails is recorded with its error and does not stop the others.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    jobs_path, result_path = sys.argv[1], sys.argv[2]
    with open(jobs_path) as f:
        jobs = json.load(f)

    from importlib.metadata import version

    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    torch.set_num_threads(1)  # results must not depend on the machine's core count
    result = {"mergekit": version("mergekit"), "torch": torch.__version__, "jobs": {}}
    for job in jobs:
        start = time.perf_counter()
        error = None
        try:
            with open(job["config"]) as f:
                config = MergeConfiguration.model_validate(yaml.safe_load(f))
            options = MergeOptions(**{"copy_tokenizer": False, "write_model_card": False, "quiet": True,
                                      "random_seed": job.get("seed"), **job.get("options", {})})
            run_merge(config, job["out"], options)
        except Exception:  # recorded per job; the test reports it
            error = traceback.format_exc()
        result["jobs"][job["name"]] = {"seconds": time.perf_counter() - start, "error": error}
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
