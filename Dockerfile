# syntax=docker/dockerfile:1
#
# The pgprojector daemon:
#   docker build -t pgprojector .
#   docker run --rm -e PGPROJECTOR_DSN=postgresql://user:pass@db:5432/app pgprojector migrate
#   docker run -d  -e PGPROJECTOR_DSN=postgresql://user:pass@db:5432/app pgprojector
# tests/test_container_files.py runs this file's build and install commands outside Docker.

# Builder: only what the wheel is made of, so the image never holds the checkout.
FROM python:3.12-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY sql ./sql
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The wheel is bind-mounted, not copied: it leaves no layer behind. Its dependencies come from
# the index; `metrics` adds the Prometheus endpoint (off until PGPROJECTOR_METRICS_PORT is set).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    set -eu; wheel="$(echo /wheels/pgprojector-*.whl)"; python -m pip install "${wheel}[metrics]"
# A fixed numeric UID, so that orchestrators enforcing runAsNonRoot can check it.
RUN useradd --system --user-group --uid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pgprojector
USER 10001:10001

# SIGTERM: the daemon finishes the batch in hand, commits and exits 0.
STOPSIGNAL SIGTERM
# Healthy while this container's daemon (registered under the container's host name) keeps its heartbeat
# in the database fresh and its projections moving; another container's daemon does not count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 CMD ["pgprojector", "health", "--this-host"]
ENTRYPOINT ["pgprojector"]
CMD ["run"]
