#!/usr/bin/env bash
# Training-step speed of two commits, side by side: child processes alternate A/B (the order
# flips every round, so neither always runs second), the same step (experiments/ab_step.py).
#   bash experiments/compare_commits.sh <rev A> <rev B> [rounds]    # e.g. ac295a9 HEAD 8
# Prints, per configuration, B's speed over A's: the median of per-round ratios.
set -euo pipefail
A=${1:?rev A}; B=${2:?rev B}; ROUNDS=${3:-8}
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
TMP=$(mktemp -d); trap 'git -C "$REPO" worktree remove --force "$TMP/a" >/dev/null 2>&1 || true; git -C "$REPO" worktree remove --force "$TMP/b" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
git -C "$REPO" worktree add -q --detach "$TMP/a" "$A"
git -C "$REPO" worktree add -q --detach "$TMP/b" "$B"
export OMP_WAIT_POLICY=PASSIVE
for cfg in "air torch" "air fast" "mapt torch" "mapt fast"; do
  for ((r = 1; r <= ROUNDS; r++)); do
    order="a b"; (( r % 2 == 0 )) && order="b a"
    for t in $order; do
      # shellcheck disable=SC2086
      s=$(cd "$TMP" && PYTHONPATH="$TMP/$t/src" python "$REPO/experiments/ab_step.py" $cfg)
      echo "$cfg $r $t $s"
    done
  done
done | python3 -c '
import collections, json, statistics, sys
t = collections.defaultdict(lambda: collections.defaultdict(dict))
for line in sys.stdin:
    arch, drop, r, side, js = line.split(maxsplit=4)
    t[f"{arch} {drop}"][r][side] = json.loads(js)["median_s"]
print("config        B speed / A speed (median of rounds)   per-round range   A, B pairs/s")
for cfg, rounds in t.items():
    ratios = [v["a"] / v["b"] for v in rounds.values()]
    a = statistics.median(v["a"] for v in rounds.values())
    b = statistics.median(v["b"] for v in rounds.values())
    print(f"{cfg:12s}  {statistics.median(ratios):.3f}  {min(ratios):.3f}-{max(ratios):.3f}  {64 / a:.0f}, {64 / b:.0f}")
'
