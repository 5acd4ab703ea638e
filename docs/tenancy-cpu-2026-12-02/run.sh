#!/usr/bin/env bash
# Tenants under saturation on the local CPU cluster, from the repository root; writes results/{noisy,saturation}/.
#   bash docs/tenancy-cpu-2026-12-02/run.sh noisy fair fcfs   # the noisy neighbour, fair shares then without
#   bash docs/tenancy-cpu-2026-12-02/run.sh saturation [PART...]  # shares classes overload (default), budget
# noisy: a quiet tenant alone, then beside a noisy one, once per label: fcfs (the shipped config) or any other label
# (FAIR_CONFIG, default fair.yaml here: cluster/configs/local.yaml with router.fairness on, 4 small / 2 large calls in
# flight; engine-priority.yaml: 32 / 32 in flight and the order passed to vLLM's priority scheduler; engine-fcfs.yaml:
# 32 / 32 without it). saturation (saturation.yaml: fair.yaml with the router's queue bounded at 24 waiting calls):
# tenants of weights 1 and 2, then an interactive beside a batch tenant, both above capacity for 180 s, then overload
# at about 3x capacity (both classes) for 300 s; budget: a tenant capped at 10% large steps beside one without a cap,
# both under capacity for 300 s. USERS, QUIET_USERS and DURATION set the noisy runs' load, SHARE_USERS the shares
# run's (half each), SHARE_OPTIONS more tenant options for both of its tenants (for example --policy=forced_fraction:
# a quarter of each request's steps large, the same mix for both), SHARE_LOCUST its locustfile options (for example
# "--token-budget 48 --step-max-tokens 16 --final-max-tokens 16"), SATURATION_CONFIG another config for the saturation
# runs (shares.yaml here: fair.yaml without the load-aware tau controller).
set -u
HERE=docs/tenancy-cpu-2026-12-02
export PATH="$PWD/.venv/bin:$PATH" REDIS_URL=redis://127.0.0.1:6390/0

up() {  # CONFIG OUT
  python -m cluster down >/dev/null 2>&1
  python -m cluster up --no-sample --config $1 > $2/up-$(basename $1 .yaml).log 2>&1 || exit 1
}
tenants() {  # FILE NAME OPTIONS NAME OPTIONS (each one word, or quoted): two tenants, the first the quiet one
  local file=$1; shift; : > $file
  for spec in "$1 $2" "$3 $4"; do
    set -- $spec
    python -m cluster tenants delete $1 >/dev/null 2>&1
    python -m cluster tenants create $1 --rpm 10000 --concurrent 64 "${@:2}" --json >> $file
  done
}
run() {  # OUT LABEL TENANTS QUIET_RATE NOISY_RATE USERS QUIET_USERS DURATION STOP_TIMEOUT [RUNNER OPTIONS]
  local out=$1 label=$2 file=$3 quiet=$4 noisy=$5 users=$6 quiet_users=$7 duration=$8 stop=$9; shift 9
  python -m loadtests.noisy_neighbour --url http://127.0.0.1:8000 --tenants-file $file --admin-key-file run/admin.key \
    --quiet-rate $quiet --noisy-rate $noisy --users $users --quiet-users $quiet_users --duration $duration \
    --stop-timeout $stop --label $label --out $out "$@"
}

case ${1:-} in
  noisy)
    shift; OUT=results/noisy; mkdir -p $OUT
    for label in "$@"; do
      up $([ $label = fcfs ] && echo cluster/configs/local.yaml || echo ${FAIR_CONFIG:-$HERE/fair.yaml}) $OUT
      tenants $OUT/tenants-$label.json quiet --weight=1 noisy --weight=1
      run $OUT $label $OUT/tenants-$label.json 0.1 0.8 ${USERS:-28} ${QUIET_USERS:-8} ${DURATION:-180s} 90s
    done
    [ -f $OUT/fair.json ] && [ -f $OUT/fcfs.json ] && python -m loadtests.noisy_neighbour --compare $OUT/fair.json $OUT/fcfs.json
    ;;
  saturation)
    shift; OUT=results/saturation; mkdir -p $OUT
    up ${SATURATION_CONFIG:-$HERE/saturation.yaml} $OUT
    for part in ${@:-shares classes overload}; do
      case $part in
        shares)
          users=${SHARE_USERS:-20}
          tenants $OUT/tenants-shares.json light "--weight=1 ${SHARE_OPTIONS:-}" heavy "--weight=2 ${SHARE_OPTIONS:-}"
          run $OUT shares-$users $OUT/tenants-shares.json 0.6 0.6 $users $((users / 2)) 180s 120s --shared-only \
            --metrics-url auto ${SHARE_LOCUST:+-- $SHARE_LOCUST} ;;
        classes)
          tenants $OUT/tenants-classes.json inter --priority=interactive bulk --priority=batch
          run $OUT classes $OUT/tenants-classes.json 0.6 0.6 20 10 180s 120s --shared-only ;;
        overload)
          tenants $OUT/tenants-overload.json inter --priority=interactive bulk --priority=batch
          run $OUT overload $OUT/tenants-overload.json 0.3 0.6 48 16 300s 400s --shared-only ;;
        budget)
          tenants $OUT/tenants-budget.json capped --max-large-fraction=0.1 free --weight=1
          run $OUT budget $OUT/tenants-budget.json 0.12 0.12 16 8 300s 120s --shared-only --metrics-url auto ;;
        *) echo "unknown part $part (shares, classes, overload, budget)" >&2; exit 2 ;;
      esac
    done
    ;;
  *) echo "usage: $0 noisy LABEL... | saturation [shares|classes|overload...]" >&2; exit 2 ;;
esac
python -m cluster down >/dev/null 2>&1
