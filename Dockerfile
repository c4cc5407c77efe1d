# The Headrace image for docker-compose.yml: stream worker and gRPC server.
FROM python:3.11-slim

# lightgbm needs the OpenMP runtime.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install '.[stream,serve,offline]'

RUN useradd --create-home --uid 10001 headrace \
    && mkdir -p /var/lib/headrace /models \
    && chown headrace /var/lib/headrace
USER headrace

EXPOSE 50051 9108 9109
CMD ["headrace", "--help"]
