# syntax=docker/dockerfile:1
# Build stage: a virtual environment with the service and its dependencies.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN /opt/venv/bin/pip install .

# Runtime stage: the environment and the project files, run by a non-root user.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    NEWSLETTER_DATA_DIR=/data
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin newsletter \
    && mkdir -p /data && chown newsletter /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The code is imported from /app (PYTHONPATH), so templates, static files, translations
# and migrations are found beside it.
COPY service ./service
COPY templates ./templates
COPY static ./static
COPY translations ./translations
COPY migrations ./migrations
COPY alembic.ini ./
USER newsletter
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["newsletter", "serve", "--host", "0.0.0.0", "--port", "8000"]
