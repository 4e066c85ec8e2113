# poller: one image for the CronJob (`sync`, the default command), the daemon (args ["run"],
# port 8080: /healthz /readyz /metrics), backfill and verify Jobs, and manual runs.
# Two stages: the build stage makes a virtual environment from the pinned requirements (its
# own layer, cached until requirements.txt changes); the final stage copies only that.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY requirements.txt .
RUN python -m venv /opt/poller \
    && /opt/poller/bin/pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY poller ./poller
RUN /opt/poller/bin/pip install --no-cache-dir --no-deps .

FROM python:3.11.13-slim-bookworm
# No HEALTHCHECK: Kubernetes probes the daemon's /healthz and /readyz itself (see
# deploy/kubernetes), and the same image runs run-to-completion Jobs that serve nothing.
# checkov:skip=CKV_DOCKER_2: health is Kubernetes' liveness and readiness probes, not Docker's
LABEL org.opencontainers.image.title="poller" \
      org.opencontainers.image.description="Keeps an S3 archive of Threat Stack alerts complete by polling the v2 API" \
      org.opencontainers.image.version="0.1.0"
ENV PATH=/opt/poller/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=build /opt/poller /opt/poller
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin poller
# Runs as non-root with a read-only root filesystem: nothing is written outside /tmp.
USER 10001
WORKDIR /tmp
EXPOSE 8080
# SIGTERM: the run stops between pages, releases the lease, and exits (143, or 0 for `run`).
STOPSIGNAL SIGTERM
# Settings come from the environment (THREATSTACK_*, TS_AWS_S3_*, AWS_*, POLLER_*) or a
# mounted file named by POLLER_CONFIG.
ENTRYPOINT ["python", "-m", "poller"]
CMD ["sync"]
