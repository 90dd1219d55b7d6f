#!/usr/bin/env bash
# The CPU probe study of docs/probes.md: the Griffin paper's three Section 6 findings at CPU scale.
# About 15 minutes on 2 cores; run on an otherwise idle machine.
set -euo pipefail
OUT=${1:-runs/probe_study}
for seed in 0 1; do
  griffon probe train induction --models griffin,hawk,mqa --out "$OUT/induction-s$seed" --steps 800 \
      --seed "$seed" --lengths 64 128 256 512 1024
done
griffon probe train selective-copy --models griffin,hawk,mqa --out "$OUT/copy-s0" --train-length 64 --window 32 \
    --steps 2000 --seed 0 --lengths 64 128 256 1024
griffon probe train phonebook --models griffin,hawk,mqa --out "$OUT/phonebook-s0" --train-length 10 --window 64 \
    --steps 1500 --seed 0 --lengths 10 20 40 80 160
