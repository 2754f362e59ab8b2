"""The registry of merge methods, by their MergeKit names; one module per family:

- task_arithmetic.py: task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
  breadcrumbs_ties, della, della_linear (sparsifiers in sparsify.py, exact ranks in radix.py);
- linear.py: linear;
- slerp.py: slerp, nuslerp (Gram pass in gram.py);
- model_stock.py: model_stock;
- multislerp.py: multislerp; karcher.py: karcher; ram.py: ram, ramplus_tl;
- passthrough.py: passthrough; nearswap.py: nearswap; arcee_fusion.py: arcee_fusion; sce.py: sce.

base.py is the contract (`MergeMethod`, `Pass`, `Block`, `TensorContext`). MergeKit's parameter
names, defaults and formulas are the reference (docs/merge_methods.md). Importing this package
imports torch: callers that must stay light (request parsing) import it where they need a method.
"""

from __future__ import annotations

from ...errors import BadMerge
from .arcee_fusion import ARCEE_FUSION
from .base import MergeMethod
from .karcher import KARCHER
from .linear import LINEAR
from .model_stock import MODEL_STOCK
from .multislerp import MULTISLERP
from .nearswap import NEARSWAP
from .passthrough import PASSTHROUGH
from .ram import RAM, RAMPLUS_TL
from .sce import SCE
from .slerp import NUSLERP, SLERP
from .task_arithmetic import FAMILY

METHODS: tuple[MergeMethod, ...] = (*FAMILY, LINEAR, SLERP, NUSLERP, MODEL_STOCK,
                                   MULTISLERP, KARCHER, RAM, RAMPLUS_TL,
                                   PASSTHROUGH, NEARSWAP, ARCEE_FUSION, SCE)
REGISTRY: dict[str, MergeMethod] = {m.name: m for m in METHODS}


def names() -> list[str]:
    """Every method's name, sorted."""
    return sorted(REGISTRY)


def get(name: str) -> MergeMethod:
    """The method called `name`; an unknown name is a user error that lists the known ones."""
    if name not in REGISTRY:
        raise BadMerge(f"unknown merge method {name!r} (known: {', '.join(names())})")
    return REGISTRY[name]
