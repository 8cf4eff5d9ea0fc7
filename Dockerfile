# kvrec: one image for every role (train, api, locust master and workers, sweep, demo).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# redis-server only for the embedded default (`kvrec serve` without --redis-url, `kvrec demo`,
# `kvrec sweep`); the compose stack uses its own redis service.
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# CPU torch first: the default wheel pulls in gigabytes of CUDA libraries a CPU service never uses.
# Its own layer, so code changes do not re-download it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.2"

COPY pyproject.toml README.md ./
COPY kvrec ./kvrec
COPY models ./models
COPY compression ./compression
COPY server ./server
COPY loadtest ./loadtest
RUN pip install .

# Unprivileged at run time; /models and /results are the compose stack's shared volumes.
RUN useradd --create-home --uid 1000 kvrec && mkdir -p /models /results && chown kvrec /models /results
USER kvrec

EXPOSE 8000 8089
CMD ["kvrec", "--help"]
