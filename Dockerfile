# Detector worker image (also used by the simulator service of docker-compose.yml).
#   docker build -t callback-fraud-detector .
#   docker run --rm -e DETECTOR_KAFKA_BOOTSTRAP=kafka:9092 -e DETECTOR_WEB_BIND=0.0.0.0 \
#       -p 6066:6066 callback-fraud-detector   # /metrics and /healthz bind 127.0.0.1 by default
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first (cached while only the code changes): the pinned set from pyproject.toml.
COPY pyproject.toml README.md ./
# (plus the rocksdb extra, so that DETECTOR_TABLE_STORE=rocksdb works in the image).
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\\n'.join(p['dependencies'] + p['optional-dependencies']['rocksdb']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY setup.py ./
COPY detector ./detector
# The C extensions (setup.py) need a compiler at build time only; the import check fails the build
# rather than ship an image that runs the slower Python fallback unnoticed.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
 && pip install --no-deps . \
 && apt-get purge -y gcc libc6-dev libssl-dev && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && cd / && python -c "import detector.core._popcount, detector.core._forest, detector.core._keyed" \
 && useradd --system --uid 10001 --home-dir /var/lib/detector --create-home detector
COPY models ./models

ENV DETECTOR_MODELS_DIR=/app/models \
    DETECTOR_DATA_DIR=/var/lib/detector \
    DETECTOR_WEB_PORT=6066

USER detector
EXPOSE 6066
ENTRYPOINT ["detector"]
CMD ["worker"]
