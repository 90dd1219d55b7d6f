#!/usr/bin/env bash
# The CPU probe study of docs/probes.md: the Griffin paper's three Section 6 findings at CPU scale.
# About half an hour on 2 cores idle (a killed study resumes: rerun it; more seeds join a finished
# one), run on an otherwise idle machine: two lanes of one thread each (tiny models train faster on
# one thread apiece than on two threads in turn).
set -euo pipefail
OUT=${1:-runs/probe_study}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
(
  griffon probe train induction --models griffin,hawk,mqa --out "$OUT/induction" --steps 1500 --seeds 0 1 \
      --lengths 64 128 256 512 1024
  griffon probe train phonebook --models mqa,hawk,griffin --out "$OUT/phonebook" --param digits=3 \
      --train-length 4 --window 16 --steps 1500 --seeds 0 --lengths 4 8 16 32 64
) > "$OUT/lane1.log" 2>&1 &
lane1=$!
griffon probe train selective-copy --models griffin,hawk,mqa --out "$OUT/selective-copy" --param data_tokens=8 \
    --train-length 64 --window 32 --steps 2500 --seeds 0 1 2 --lengths 64 128 256 512 1024 > "$OUT/lane2.log" 2>&1
wait "$lane1"
