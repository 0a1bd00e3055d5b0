# One image for every AaS service (workers, aggregator, beat, Flower, registry, inference).
#   docker build -t aas:cpu .
#   docker build -t aas:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu121 .
# Configuration is only AAS_* environment variables at run time; nothing secret is baked in.
FROM python:3.11-slim

# torch comes first from its own index (CPU wheels by default: ~200 MB instead of ~2 GB with CUDA),
# so `pip install .` below finds it satisfied and does not pull the default CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.3"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY storage ./storage
COPY workers ./workers
RUN pip install . && useradd --create-home --uid 10001 aas && mkdir -p /app/var && chown aas /app/var

USER aas
# Each compose service sets its own command (a worker, beat, Flower, the registry or inference).
CMD ["aas", "--help"]
