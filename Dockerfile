# rsmatch on a GPU cluster. Build: docker build -t rsmatch .
# Run:  docker run --gpus all -v $PWD/runs:/work/runs -v hf:/home/rsmatch/.cache/huggingface \
#         -e HF_TOKEN rsmatch accelerate launch --multi_gpu launch/train.py --config configs/rsmatch.yaml
# The token is read from the environment at run time only; nothing secret is baked in.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DS_BUILD_OPS=0 \
    HF_HOME=/home/rsmatch/.cache/huggingface

RUN useradd --create-home --uid 1000 rsmatch
WORKDIR /work
COPY --chown=rsmatch:rsmatch pyproject.toml README.md ./
COPY --chown=rsmatch:rsmatch rsmatch ./rsmatch
# Our own package from the build context; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[deepspeed,generate,viz]"
COPY --chown=rsmatch:rsmatch launch ./launch
COPY --chown=rsmatch:rsmatch configs ./configs
COPY --chown=rsmatch:rsmatch data ./data

USER 1000:1000
VOLUME ["/home/rsmatch/.cache/huggingface", "/work/runs"]
CMD ["python", "launch/train.py", "--config", "configs/demo.yaml"]
