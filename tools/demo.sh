#!/usr/bin/env bash
# The main job end to end on a small generated family: init -> add -> log/show/ls -> diff ->
# checkout -> merge -> replay -> plan/merge within an I/O budget -> checkout -> status/fsck.
# Run through `make demo`, which builds the venv first. Everything lands in ./demo (recreated).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
rm -rf demo && mkdir demo && cd demo

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$BIN/python" ../tools/make_family.py family --experts 3 --hidden 256 --layers 4 --seed 7
step "$BIN/mp" init
step "$BIN/mp" add family/base --name base -m "base model"
for i in 1 2 3; do
  step "$BIN/mp" add "family/expert-$i" --name "expert-$i" --base base -m "expert $i"
done
step "$BIN/mp" branch
step "$BIN/mp" log expert-2
step "$BIN/mp" show expert-2
step "$BIN/mp" ls expert-2
step "$BIN/mp" diff base expert-2 --plot diff-base-expert-2.png
step "$BIN/mp" diff base expert-3
step "$BIN/mp" checkout expert-2 -o out/expert-2
step diff -r out/expert-2 family/expert-2
step "$BIN/mp" merge --method ties --base base expert-1 expert-2 expert-3 --weight 0.4 --density 0.5 \
  --out-dtype bfloat16 -b merged -m "ties of three experts"
step "$BIN/mp" show merged
step "$BIN/mp" replay merged
step "$BIN/mp" plan --method task_arithmetic --base base expert-1 expert-2 expert-3 --weight 0.4 \
  --out-dtype bfloat16 --budget 25%
step "$BIN/mp" merge --method task_arithmetic --base base expert-1 expert-2 expert-3 --weight 0.4 \
  --out-dtype bfloat16 --budget 25% -b budgeted -m "task arithmetic within a quarter of the expert reads"
step "$BIN/mp" show budgeted
step "$BIN/mp" replay budgeted
# A published-style MergeKit config as people bring it from a model card: a gradient slerp over
# `slices:` with filters per module (refs where MergeKit has folders).
cat > gradient-slerp.yml <<'YAML'
slices:
  - sources:
      - model: base
        layer_range: [0, 4]
      - model: expert-1
        layer_range: [0, 4]
merge_method: slerp
base_model: base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
YAML
step cat gradient-slerp.yml
step "$BIN/mp" merge --config gradient-slerp.yml -b slerped -m "gradient slerp from a model card"
step "$BIN/mp" replay slerped
step "$BIN/mp" log --graph merged
step "$BIN/mp" diff base merged
step "$BIN/mp" checkout merged -o out/merged
step "$BIN/mp" status
step "$BIN/mp" fsck
echo
echo "demo ok: expert-2 checked out byte-identical; a ties merge committed, replayed identical and"
echo "checked out to demo/out/merged; a merge within 25% of the expert reads planned, committed and"
echo "replayed identical; a MergeKit gradient-slerp config with slices merged and replayed identical;"
echo "heatmap in demo/diff-base-expert-2.png"
