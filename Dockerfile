# rsmatch on GPU machines and clusters: see docs/docker.md. Build: docker build -t rsmatch .
# torch comes from PyPI at the version the tests ran on (docker/constraints.txt pins every
# dependency); its Linux wheel carries the CUDA runtime, so the host needs only the NVIDIA driver
# and container toolkit. The token is read from the environment at run time; nothing secret is
# baked in.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0 HF_HOME=/home/rsmatch/.cache/huggingface

# The volume folders exist in the image and belong to the user, so named volumes mounted on
# them are writable by it (Docker would otherwise create them owned by root).
RUN useradd --create-home --uid 1000 rsmatch \
    && mkdir -p /work/runs /work/synthetic /work/benchmarks "$HF_HOME" \
    && chown -R rsmatch:rsmatch /work /home/rsmatch/.cache
WORKDIR /work
COPY docker/constraints.txt /tmp/constraints.txt
COPY --chown=rsmatch:rsmatch pyproject.toml README.md ./
COPY --chown=rsmatch:rsmatch rsmatch ./rsmatch
# Versions come from the constraints file, not from pins on this line.
# hadolint ignore=DL3013
RUN pip install --constraint /tmp/constraints.txt ".[deepspeed,generate]"
COPY --chown=rsmatch:rsmatch launch ./launch
COPY --chown=rsmatch:rsmatch configs ./configs
COPY --chown=rsmatch:rsmatch data ./data

# The commit run.json records (the image has no git checkout):
#   docker build --build-arg RSMATCH_GIT_COMMIT=$(git rev-parse HEAD) -t rsmatch .
ARG RSMATCH_GIT_COMMIT=unknown
ENV RSMATCH_GIT_COMMIT=$RSMATCH_GIT_COMMIT
USER 1000:1000
VOLUME ["/home/rsmatch/.cache/huggingface", "/work/runs", "/work/synthetic", "/work/benchmarks"]
CMD ["python", "launch/train.py", "--config", "configs/demo.yaml"]
