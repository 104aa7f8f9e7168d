# Fluidity agent image (optional: the agent usually runs as `fluidity agent` on the laptop).
#   docker build -f deployments/docker/agent.Dockerfile -t fluidity-agent .
#   docker run --rm -p 127.0.0.1:8080:8080 -v "$PWD/certs:/app/certs:ro" fluidity-agent --server-ip 203.0.113.7
# Publish the port on 127.0.0.1 only: inside the container the proxy must listen on 0.0.0.0.

FROM python:3.12-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --wheel-dir /wheels .

FROM python:3.12-slim-bookworm
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FLUIDITY_LOCAL_PROXY_ADDR=0.0.0.0 FLUIDITY_ALLOW_NON_LOOPBACK=true
COPY --from=build /wheels /wheels
RUN pip install --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin fluidity
COPY configs/agent.yaml /etc/fluidity/agent.yaml
WORKDIR /app
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
# The proxy port accepts a TCP connection while the agent runs.
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8080), 3).close()"]
ENTRYPOINT ["fluidity", "agent", "--config", "/etc/fluidity/agent.yaml"]
