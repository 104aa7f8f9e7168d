#!/usr/bin/env bash
# Stop the Fluidity server on AWS Fargate (desired count 0): billing pauses once the
# task has drained.
# The logic lives in `fluidity cloud stop` (docs/fargate.md); this script keeps the deployment
# guide's name and forwards its arguments (e.g. --cluster, --service, --region, --profile).
# Environment: FLUIDITY_CLUSTER_NAME, FLUIDITY_SERVICE_NAME, AWS_REGION, AWS_PROFILE,
# AWS_ENDPOINT_URL; FLUIDITY names the fluidity executable (default: the repository's .venv, then PATH).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${FLUIDITY:-}" ]]; then
  fluidity="$FLUIDITY"
elif [[ -x "$repo/.venv/bin/fluidity" ]]; then
  fluidity="$repo/.venv/bin/fluidity"
elif command -v fluidity >/dev/null 2>&1; then
  fluidity="fluidity"
else
  echo "fluidity not found: run 'make install' in $repo or 'pip install \"fluidity[aws]\"'" >&2
  exit 1
fi

exec "$fluidity" cloud stop "$@"
