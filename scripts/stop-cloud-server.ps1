# Stop the Fluidity server on AWS Fargate (desired count 0): billing pauses once the
# task has drained.
# The logic lives in `fluidity cloud stop` (docs/fargate.md); this script keeps the deployment
# guide's name and forwards its arguments, exactly like stop-cloud-server.sh.
# Environment: FLUIDITY_CLUSTER_NAME, FLUIDITY_SERVICE_NAME, AWS_REGION, AWS_PROFILE,
# AWS_ENDPOINT_URL; FLUIDITY names the fluidity executable (default: the repository's .venv, then PATH).
$ErrorActionPreference = "Stop"

$repo = Split-Path -Parent $PSScriptRoot
$candidates = @(
    (Join-Path $repo ".venv/Scripts/fluidity.exe"),  # Windows virtual environment
    (Join-Path $repo ".venv/bin/fluidity")           # macOS / Linux virtual environment
)
if ($env:FLUIDITY) {
    $fluidity = $env:FLUIDITY
} elseif ($found = $candidates | Where-Object { Test-Path $_ } | Select-Object -First 1) {
    $fluidity = $found
} elseif (Get-Command fluidity -ErrorAction SilentlyContinue) {
    $fluidity = "fluidity"
} else {
    Write-Error "fluidity not found: run 'make install' in $repo or 'pip install ""fluidity[aws]""'"
    exit 1
}

& $fluidity cloud stop @args
exit $LASTEXITCODE
