#!/usr/bin/env bash
# Submit a distill run to a Ray cluster as a Ray job. The same config runs on a laptop (embedded
# Ray) and here: under `ray job submit` the driver finds the cluster through RAY_ADDRESS, which
# the job supervisor sets.
#
#   cluster/submit.sh [RAY_JOB_SUBMIT_OPTIONS... --] CONFIG [KEY=VALUE ...]
#
#   export RAY_ADDRESS=http://HEAD:8265          # the head's dashboard (job API) address
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...  # if the cluster uses token auth (it should)
#   cluster/submit.sh configs/r1_distill_1p5b_vllm.yaml
#   cluster/submit.sh --no-wait --submission-id r1-a -- configs/quickstart.yaml run.dir=/shared/runs/qs
#   ray job logs -f r1-a; ray job status r1-a; ray job stop r1-a
#
# Run it from the repository root: `--working-dir .` uploads this checkout (minus .gitignore'd
# files and the runtime_env's excludes) to every node and puts it on PYTHONPATH, so the workers
# import this exact `distill`. DISTILL_RUNTIME_ENV names another runtime_env file (default
# cluster/runtime_env.yaml). Paths in the config (run.dir, source.path, benchmarks) are read on
# the cluster: use shared storage or Hub ids, not paths on this laptop.
set -euo pipefail
runtime_env=${DISTILL_RUNTIME_ENV:-cluster/runtime_env.yaml}
ray_opts=()
for arg in "$@"; do
    if [[ $arg == -- ]]; then
        # Everything before the first `--` is for `ray job submit`.
        while [[ $1 != -- ]]; do ray_opts+=("$1"); shift; done
        shift
        break
    fi
done
config=${1:?usage: cluster/submit.sh [RAY_JOB_SUBMIT_OPTIONS... --] CONFIG [KEY=VALUE ...]}
shift
if [[ ! -f $config ]]; then
    echo "submit.sh: $config not found (run from the repository root; CONFIG is a path in it)" >&2
    exit 2
fi
exec ray job submit --working-dir . --runtime-env "$runtime_env" "${ray_opts[@]}" \
    -- python -m distill.cli run "$config" "$@"
