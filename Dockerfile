# SLIP queue runtime image: one Celery worker per GPU (the default command), also used for Flower and
# the producer (`slip submit ...`). CUDA comes with the torch wheels from PyPI (Linux x86_64 wheels bundle
# the CUDA runtime); the NVIDIA container toolkit on the host injects the driver.
#
#   docker build -t slip-queue .
#   docker run --gpus device=0 -e SLIP_BROKER_URL=redis://HOST:6379/0 -v slip-store:/store -v slip-cache:/cache slip-queue
#   docker run ... -e SLIP_STORE=s3://bucket/slip -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#       -e AWS_DEFAULT_REGION [-e AWS_ENDPOINT_URL=https://minio.example:9000] slip-queue      # S3 store
#
# Volumes: /store (the object store, SLIP_STORE, unless it is s3://...) and /cache (model weights, SLIP_CACHE;
# put weights there with `docker compose run --rm worker slip weights fetch vit_b`). Runs as the non-root
# user `slip`.
FROM python:3.11-slim

ARG SLIP_UID=1000

# Every package comes from the lock requirements/runtime.txt (the project and its s3 extra, hash-checked,
# the same versions CI tests against; `bash scripts/lock.sh` refreshes it): nothing is resolved at build.
# torch is the pinned CUDA build from PyPI (Linux x86_64 wheels bundle the CUDA runtime). Bytecode is compiled
# at build: the image runs as a user who cannot write it, so each process would compile its imports again.
COPY requirements/uv.txt requirements/runtime.txt requirements/torch.txt /tmp/req/
RUN pip install --require-hashes --no-deps -r /tmp/req/uv.txt \
 && uv pip install --system --compile-bytecode --require-hashes --no-deps -r /tmp/req/runtime.txt \
 && rm -rf /root/.cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY slip ./slip
COPY worker ./worker
COPY producer ./producer
COPY jobs ./jobs
# the s3 extra (s3fs) lets SLIP_STORE be s3://bucket/prefix: AWS S3 or any S3-compatible store through
# AWS_ENDPOINT_URL; credentials come from the AWS_* variables or an instance role, never from the image
RUN uv pip install --system --compile-bytecode --no-deps . \
 && python -c "import slip, worker, producer, s3fs"

# non-root user; the volume mount points are created owned by it so that fresh named volumes inherit
# the ownership on first mount
RUN useradd --create-home --uid "${SLIP_UID}" --shell /usr/sbin/nologin slip \
 && mkdir -p /store /cache /data \
 && chown slip:slip /store /cache /data

ENV SLIP_STORE=/store \
    SLIP_CACHE=/cache \
    SLIP_DEVICE=cuda:0 \
    SLIP_BROKER_URL=redis://redis:6379/0

VOLUME ["/store", "/cache"]
USER slip
WORKDIR /home/slip

# One worker process per container (= per GPU): models load once, after the fork, in the process that
# uses them. SIGTERM starts Celery's warm shutdown: the running task finishes, nothing new is taken.
STOPSIGNAL SIGTERM
CMD ["celery", "-A", "worker", "worker", "-Q", "gpu,cpu", "--concurrency", "1", \
     "--hostname", "worker@%h", "--loglevel", "INFO"]
