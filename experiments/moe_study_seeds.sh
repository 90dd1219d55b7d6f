#!/usr/bin/env bash
# Seed spread of the MoE study's best size (w32): Griffin and Griffin-MoE at every budget of
# experiments/moe_study.json, trained again with seeds 1 and 2 (seed 0 is the study itself).
# Each seed's spec is the study's, restricted to those families and that size. About 30 minutes
# of a 2-core machine, two runs at a time.
#
#   bash experiments/moe_study_seeds.sh [OUT]      # default runs/moe_study_seeds
set -euo pipefail
out=${1:-runs/moe_study_seeds}
export OMP_NUM_THREADS=1
for seed in 1 2; do
  mkdir -p "$out/seed$seed"
  python - "$seed" "$out/seed$seed/spec.json" <<'PY'
import json, sys
spec = json.load(open("experiments/moe_study.json"))
spec["families"] = {k: spec["families"][k] for k in ("griffin", "griffin-moe")}
spec["families"]["griffin-moe"]["sizes"] = {"w32": spec["families"]["griffin-moe"]["sizes"]["w32"]}
spec["sizes"] = {"w32": spec["sizes"]["w32"]}
spec["isoflop"]["per_budget"] = 1
spec["seed"] = int(sys.argv[1])
json.dump(spec, open(sys.argv[2], "w"), indent=2)
PY
done
runs=$(griffon sweep "$out/seed1/spec.json" --out "$out/seed1" --dry-run | awk 'NR > 1 && NF == 7 {print $1}')
for seed in 1 2; do
  for run in $runs; do
    griffon sweep "$out/seed$seed/spec.json" --out "$out/seed$seed" --run "$run" > "$out/seed$seed/$run.log" 2>&1 &
    while [ "$(jobs -rp | wc -l)" -ge 2 ]; do sleep 5; done
  done
done
wait
for seed in 1 2; do griffon sweep "$out/seed$seed/spec.json" --out "$out/seed$seed" --collect; done
