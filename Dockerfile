# The project image: library, worker, Beat, Flower and the vLLM simulator (docker-compose.yml runs them all).
# Keys are never baked in: the compose file mounts them read-only from named volumes at /keys/*.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md celeryconfig.py beat_schedule.py ./
COPY provider ./provider
COPY tasks ./tasks
COPY simulator ./simulator
RUN pip install ".[simulator,flower]" \
    && rm -rf /src/build /src/*.egg-info

# A non-root user; the key and Beat directories belong to it so that fresh named volumes mounted there do too.
RUN groupadd --system --gid 10001 fleet \
    && useradd --system --uid 10001 --gid fleet --home-dir /home/fleet --create-home --shell /usr/sbin/nologin fleet \
    && mkdir -p /keys/signing /keys/verify /keys/sealing /keys/worker /keys/response-verify /data \
    && chown -R fleet:fleet /keys /data \
    && chmod 700 /keys/signing /keys/verify /keys/sealing /keys/worker /keys/response-verify

USER fleet
WORKDIR /home/fleet
EXPOSE 8000 5555
CMD ["vllm-fleet", "--help"]
