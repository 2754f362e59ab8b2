"""What comes out of the store is a model transformers loads, giving the very same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, tree_bytes
from make_family import make_family

from mpstore import Repo

transformers = pytest.importorskip("transformers")


def logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("shard_size_mb", [0, 0.05], ids=["single-file", "sharded"])
def test_checked_out_qwen2_model_gives_identical_logits(tmp_path, shard_size_mb):
    fam = make_family(tmp_path / "fam", **TINY, dtype="f32", experts=1, kinds=("lora",), seed=3,
                      shard_size_mb=shard_size_mb)
    with Repo.init(tmp_path / "repo") as repo:
        repo.add(fam["base"], "base")
        repo.add(fam["expert-1"], "lora", base="base")
        repo.checkout("lora", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(fam["expert-1"])
    ids = torch.randint(3, TINY["vocab"], (2, 12), generator=torch.Generator().manual_seed(0))
    original = logits(fam["expert-1"], ids)
    restored = logits(tmp_path / "out", ids)
    assert original.shape == (2, 12, TINY["vocab"])
    assert torch.isfinite(original).all()
    assert torch.equal(original, restored)
    # and the model really is the expert: the base's logits differ
    assert not torch.equal(logits(fam["base"], ids), restored)
