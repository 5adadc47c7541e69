#!/bin/bash
# A/B runs of this tree's worker against an earlier commit's, alternated on one device machine
# (speed differences of 0.3-1% are smaller than the spread between machines, docs/benchmarks.md).
#
#   bash bench/ab.sh prep REV        here: REV's worker/ into .ab/REV/worker (git-ignored; give the
#                                    device tool carry [".whl", ".ab"] so that it travels)
#   bash bench/ab.sh run REV "new base new base" -- python3 $R/bench/quant_bench.py --out '$OUT/$ARM-$RUN' ...
#                                    on the device, from the repository root: each arm in turn with
#                                    /tmp/pkg/inferfleet/worker linked to this tree's worker/ (new)
#                                    or to REV's (base); the command runs in /tmp, with R (the
#                                    repository root), ARM and RUN (1, 2, ...) set, its output lines
#                                    prefixed by the arm. Quote $OUT/$ARM-$RUN so that it expands per run.
set -euo pipefail
mode=${1:?prep or run}
rev=${2:?a git revision}
case "$mode" in
prep)
    rm -rf ".ab/$rev"
    mkdir -p ".ab/$rev"
    git archive "$rev" worker | tar -x -C ".ab/$rev"
    echo ".ab/$rev/worker: $(git rev-parse --short "$rev")"
    ;;
run)
    arms=${3:?arms, e.g. "new base new base"}
    shift 3
    [ "${1:-}" = "--" ] && shift
    [ -d ".ab/$rev/worker" ] || { echo "no .ab/$rev/worker: run 'bash bench/ab.sh prep $rev' here first" >&2; exit 2; }
    set +u  # device_setup.sh extends a PYTHONPATH that may be unset
    source bench/device_setup.sh
    set -u
    R=$PWD
    export R
    run=0
    for ARM in $arms; do
        run=$((run + 1))
        case "$ARM" in
        new) ln -sfn "$R/worker" /tmp/pkg/inferfleet/worker ;;
        base) ln -sfn "$R/.ab/$rev/worker" /tmp/pkg/inferfleet/worker ;;
        *) echo "arm $ARM: new or base" >&2; exit 2 ;;
        esac
        (cd /tmp && ARM=$ARM RUN=$run bash -c "$*" 2>&1 | sed "s/^/$ARM $run: /")
    done
    ln -sfn "$R/worker" /tmp/pkg/inferfleet/worker
    ;;
*)
    echo "usage: bash bench/ab.sh prep REV | run REV ARMS -- COMMAND" >&2
    exit 2
    ;;
esac
