# GPU worker image: CUDA torch, the collapse package, and a Prefect process worker polling the
# `gpu` work pool. Build:  docker build -t collapse-gpu .
# Run on a GPU machine:   docker run --gpus all -e PREFECT_API_URL=http://<server>:4200/api \
#                           -v /shared/artifacts:/opt/collapse/artifacts collapse-gpu
# The artifact root must be the same shared storage the orchestrating `collapse run` writes to.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    HF_HOME=/opt/collapse/.cache/huggingface

WORKDIR /opt/collapse
COPY pyproject.toml requirements.lock README.md ./
COPY collapse collapse
COPY flows flows
COPY configs configs
COPY data data
COPY prefect.yaml prefect.yaml
# The base image's CUDA torch satisfies the unpinned `torch` requirement; everything else is
# pinned by the lock file. Editable, so the grammar data under data/ is found next to the code.
RUN pip install -c requirements.lock -e .

# One generation at a time per GPU: the worker runs at most one flow run.
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"]
