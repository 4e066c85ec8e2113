# poller: one image for the CronJob (`sync`, the default command), the daemon (args ["run"],
# port 8080: /healthz /readyz /metrics) and manual runs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY pyproject.toml README.md ./
COPY poller ./poller
RUN pip install --no-cache-dir --no-deps . \
    && useradd --system --uid 10001 --no-create-home poller

USER 10001
EXPOSE 8080
# Settings come from the environment (THREATSTACK_*, TS_AWS_S3_*, AWS_*, POLLER_*) or a
# mounted file named by POLLER_CONFIG.
ENTRYPOINT ["python", "-m", "poller"]
CMD ["sync"]
