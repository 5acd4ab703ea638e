#!/usr/bin/env bash
# The noisy-neighbour scenario on the local CPU cluster, from the repository root: once with fair shares
# (fair.yaml: cluster/configs/local.yaml with router.fairness on, 4 small / 2 large calls in flight, queue 256),
# once with the shipped config (first come, first served). Writes results/noisy/{fair,fcfs}.json.
set -u
export PATH="$PWD/.venv/bin:$PATH" REDIS_URL=redis://127.0.0.1:6390/0
OUT=results/noisy; mkdir -p $OUT
for label in fair fcfs; do
  cfg=$([ $label = fair ] && echo docs/tenancy-cpu-2026-12-01/fair.yaml || echo local)
  python -m cluster down >/dev/null 2>&1
  python -m cluster up --no-sample --config $cfg > $OUT/up-$label.log 2>&1 || exit 1
  python -m cluster tenants delete quiet >/dev/null 2>&1; python -m cluster tenants delete noisy >/dev/null 2>&1
  python -m cluster tenants create quiet --rpm 10000 --concurrent 64 --json  > $OUT/tenants-$label.json
  python -m cluster tenants create noisy --rpm 10000 --concurrent 64 --json >> $OUT/tenants-$label.json
  python -m loadtests.noisy_neighbour --url http://127.0.0.1:8000 --tenants-file $OUT/tenants-$label.json \
    --admin-key-file run/admin.key --quiet-rate 0.1 --noisy-rate 0.8 --users 24 --quiet-users 4 \
    --duration 150s --stop-timeout 90s --label $label --out $OUT
done
python -m cluster down >/dev/null 2>&1
python -m loadtests.noisy_neighbour --compare $OUT/fair.json $OUT/fcfs.json
