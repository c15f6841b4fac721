#!/usr/bin/env bash
# Table 1 to convergence on a 2-core CPU, as run on 2026-12-05 (docs/results.md): two queues of
# runs at once, one torch thread each, in two legs, then one scoring call over all the runs
# (Original, Demons, every model; 1,000 same-class test pairs per dataset).
#   bash experiments/converge_cpu.sh          # both legs and the scoring: ~3 h 45 min on 2 cores
#   bash experiments/converge_cpu.sh first    # or one part: first | second | score
# Leg 1 trains every run under a short time cap; leg 2 goes on with the MNIST paper runs (and
# Fashion-MNIST DIRNet) from their last checkpoints (converge.py --resume) up to the default
# 40,000-step cap or a longer time cap (caps count the whole run, both legs).
# Where time is no object, `python experiments/converge.py --variant both` trains every run in
# turn under the default caps (40,000 steps, 2 h each) and scores them the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
case $part in all | first | second | score) ;; *)
    echo "usage: $0 [all | first | second | score]" >&2
    exit 2
    ;;
esac
run() {  # dataset variant model cap [flags]: one run, scored cheaply (the final call scores)
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python experiments/converge.py --datasets "$1" \
        --variant "$2" --models "$3" --max-time "$4" "${@:5}" --no-demons --test-pairs 50
}
first_a() {
    run mnist paper dirnet 00:00:25:00
    run mnist paper air 00:00:30:00
    run mnist paper mapt 00:00:35:00
}
first_b() {
    run fashion paper dirnet 00:00:15:00
    run fashion paper air 00:00:20:00
    run fashion paper mapt 00:00:20:00
    run mnist authors air 00:00:15:00
    run mnist authors mapt 00:00:20:00
    run mnist authors dirnet 00:00:08:00
}
second_a() {
    run mnist paper mapt 00:01:40:00 --resume
    run mnist paper air 00:01:15:00 --resume
}
second_b() {
    run mnist paper dirnet 00:01:30:00 --resume
    run fashion paper dirnet 00:00:55:00 --resume
}
both() {  # leg queue_a queue_b: the two queues at once, logs to logs/ (ignored by git)
    mkdir -p logs
    "$2" > "logs/converge_$1_a.log" 2>&1 &
    local a=$!
    "$3" > "logs/converge_$1_b.log" 2>&1 &
    local b=$!
    wait "$a"
    wait "$b"
}
if [[ $part == all || $part == first ]]; then both first first_a first_b; fi
if [[ $part == all || $part == second ]]; then both second second_a second_b; fi
if [[ $part == all || $part == score ]]; then
    python experiments/converge.py --variant both --score-only
fi
