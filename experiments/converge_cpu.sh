#!/usr/bin/env bash
# Table 1 to convergence on a 2-core CPU, as run on 2026-12-05 (docs/results.md): two queues of
# runs at once, one torch thread each, with the time caps below, then one scoring call over all
# the runs (Original, Demons, every model; 1,000 same-class test pairs per dataset).
#   bash experiments/converge_cpu.sh          # ~1 h 45 min on 2 cores
# Where time is no object, `python experiments/converge.py --variant both` trains every run in
# turn under the default caps (40,000 steps, 2 h each) and scores them the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
run() {  # dataset variant model cap: one run, scored cheaply (the final call scores properly)
    python experiments/converge.py --datasets "$1" --variant "$2" --models "$3" \
        --max-time "$4" --no-demons --test-pairs 50
}
queue_a() {
    run mnist paper dirnet 00:00:25:00
    run mnist paper air 00:00:30:00
    run mnist paper mapt 00:00:35:00
}
queue_b() {
    run fashion paper dirnet 00:00:15:00
    run fashion paper air 00:00:20:00
    run fashion paper mapt 00:00:20:00
    run mnist authors air 00:00:15:00
    run mnist authors mapt 00:00:20:00
    run mnist authors dirnet 00:00:08:00
}
mkdir -p logs  # ignored by git
queue_a > logs/converge_queue_a.log 2>&1 &
a=$!
queue_b > logs/converge_queue_b.log 2>&1 &
b=$!
wait "$a"
wait "$b"
unset OMP_NUM_THREADS MKL_NUM_THREADS
python experiments/converge.py --variant both --score-only
