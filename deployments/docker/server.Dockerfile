# Fluidity server image. Build from the repository root (what `make image` runs):
#   docker build --platform linux/amd64 -f deployments/docker/server.Dockerfile -t fluidity-server .
# Stage 1 builds the project's wheel and the wheels of its dependencies; stage 2 installs only
# those wheels (no compiler, no source tree, no network) and runs as an unprivileged user.

FROM python:3.12-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# The aws extra brings boto3, needed for cert_source: secretsmanager.
RUN pip wheel --wheel-dir /wheels ".[aws]"

FROM python:3.12-slim-bookworm
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FLUIDITY_HEALTH_PORT=8444
COPY --from=build /wheels /wheels
RUN pip install --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin fluidity
COPY configs/server.yaml /etc/fluidity/server.yaml
# Certificate files (cert_source: file) are read from /app/certs; on Fargate they come from
# Secrets Manager instead (FLUIDITY_CERT_SOURCE=secretsmanager in fargate.yaml).
WORKDIR /app
USER 10001:10001
EXPOSE 8443
# SIGTERM: stop accepting, GOAWAY to agents, let open streams finish for shutdown_grace, exit 0.
STOPSIGNAL SIGTERM
# Real check: the server's loopback health endpoint answers 200 only while the mTLS listener
# accepts and its event loop is responsive (see src/fluidity/server/health.py).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["fluidity", "server", "healthcheck", "--config", "/etc/fluidity/server.yaml"]
ENTRYPOINT ["fluidity", "server", "--config", "/etc/fluidity/server.yaml"]
