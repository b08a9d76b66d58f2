#!/usr/bin/env bash
# GPU checks for ONE GPU, under 10 minutes; writes the figures to GPU_NOTES.md in the repository.
#
#   bash scripts/gpu_check.sh                 # on a GPU machine (CUDA torch and requirements installed)
#   bash scripts/gpu_check.sh --smoke         # CPU rehearsal on tiny shapes (writes nothing)
#   bash scripts/gpu_check.sh --layers 8      # a shallower 7B-width model if memory is short
#
# What it checks (scripts/gpu_check.py, scripts/gpu_check_large.py): per-example gradient exactness
# on the GPU in bf16 against one-record backward passes; bf16 DP and non-private training steps of a
# random Llama with the Llama-2-7B shape (tokens/s, peak memory); the FSDP wrapping of
# utils/model/fsdp_utils.py with one process (base sharded as DTensors, LoRA plain, same DP gradient);
# sharded loading (train_clm.py --fsdp under torchrun) vs the whole base: peak GPU and host memory
# against utils/model/memory_model.py, on 8 layers of the 7B width saved to disk; the same checkpoint in
# 4 bits (bitsandbytes NF4): per-example gradient exactness with float32 LoRA, DP vs non-private
# tokens/s; train_clm.py through accelerate_configs/accelerate_config.cfg (FSDP, bf16) against a
# plain run. Nothing else in the project depends on a GPU: CI runs the CPU tests only.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

smoke=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && smoke=1; done

python - "$smoke" <<'PY' || exit 2
import sys
try:
    import torch, transformers, peft, accelerate, safetensors, tokenizers  # noqa: F401
except ImportError as err:
    sys.exit(f"gpu_check: {err}; install the CUDA build of torch 2.13.0, then `pip install -r requirements.txt`")
try:
    import bitsandbytes
    print(f"bitsandbytes {bitsandbytes.__version__}")
except ImportError:
    print("bitsandbytes not installed: section qlora will be SKIPPED (pip install bitsandbytes==0.50.2)")
if sys.argv[1] == "0" and not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (a CPU build of torch?); --smoke rehearses on CPU")
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"accelerate {accelerate.__version__}")
PY

if [ "$smoke" = 1 ]; then
    exec timeout 580 python -m scripts.gpu_check "$@"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout 580 python -m scripts.gpu_check --notes GPU_NOTES.md "$@"
