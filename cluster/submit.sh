#!/usr/bin/env bash
# Submit a distill run to a Ray cluster. The same config runs on a laptop (embedded Ray) and
# here: under `ray job submit` the driver finds the cluster through RAY_ADDRESS.
#
#   RAY_ADDRESS=http://HEAD:8265 cluster/submit.sh configs/quickstart.yaml generate.n_samples=8
set -euo pipefail
config=${1:?usage: cluster/submit.sh CONFIG [KEY=VALUE ...]}
shift
exec ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m distill.cli run "$config" "$@"
