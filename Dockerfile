# The quotaflow application image: the stream worker, the gateway and the CLI in one.
#   docker build -t quotaflow .
#   docker run --rm quotaflow --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sdk ./sdk
COPY stream_app ./stream_app
COPY producers ./producers
RUN pip install ".[stream,openai,otel,parquet]" "rich>=13"
COPY config ./config

# Table state (RocksDB-free: Faust's in-memory store plus its changelog) and nothing else.
RUN useradd --create-home --uid 10001 quotaflow && mkdir -p /data && chown quotaflow /data
USER quotaflow
ENV QUOTAFLOW_WORKER__DATA_DIR=/data \
    QUOTAFLOW_POLICIES_FILE=/app/config/policies.yaml

ENTRYPOINT ["quotaflow"]
CMD ["--help"]
