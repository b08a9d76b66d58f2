"""Run train_clm.main in a launched process (torchrun / accelerate launch) and report, per rank, how
the model's parameters were held: the frozen base sharded, the LoRA parameters whole and plain.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py <train_clm.py arguments> --fsdp

Writes $FSDP_WORKER_REPORT/rank<r>.json: the shard summary after wrapping and after training,
whether every base parameter was still on the meta device when FSDP wrapped it (no process held
the whole base), the checksum of the LoRA initialisation, the bytes sharded loading read, and the
process's peak resident memory. Also checks that the replica agreement check catches a one-ulp
drift of one process's adapter (after training, so the saved adapter is unaffected)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import train_clm  # noqa: E402
import utils.model.model_utils as model_utils  # noqa: E402
from utils.dist_utils import end_process_group  # noqa: E402
from utils.model.fsdp_utils import assert_replicas_agree, replica_checksum, shard_summary  # noqa: E402

captured = {}
_real_shard = model_utils.shard_frozen_base
_real_load = model_utils.load_local_shards


def _spy(model, *args, **kwargs):
    base = [p for p in model.parameters() if not p.requires_grad]
    captured["base_meta_at_wrap"] = all(p.is_meta for p in base)
    captured["lora_init_checksum"] = replica_checksum([p for p in model.parameters() if p.requires_grad]).tolist()
    result = _real_shard(model, *args, **kwargs)
    captured["model"] = model
    captured["after_wrap"] = shard_summary(model)
    return result


def _load_spy(*args, **kwargs):
    captured["loaded"] = _real_load(*args, **kwargs)
    return captured["loaded"]


def drift_is_detected(model):
    params = [p for p in model.parameters() if p.requires_grad]
    assert_replicas_agree(params, "check")  # equal replicas pass
    if dist.get_rank() == 1:
        with torch.no_grad():
            params[0].view(-1)[0] = torch.nextafter(params[0].view(-1)[0], torch.tensor(1.0))
    try:
        assert_replicas_agree(params, "drift")
    except RuntimeError:
        return True
    return False


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


if __name__ == "__main__":
    model_utils.shard_frozen_base = _spy
    model_utils.load_local_shards = _load_spy
    train_clm.main(sys.argv[1:])
    rank = dist.get_rank()
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "sharded": "model" in captured,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if "model" in captured:
        for key in ("after_wrap", "base_meta_at_wrap", "lora_init_checksum", "loaded"):
            report[key] = captured.get(key)
        report["after_training"] = shard_summary(captured["model"])
        report["drift_detected"] = drift_is_detected(captured["model"])
    folder = os.environ["FSDP_WORKER_REPORT"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=2)
    dist.barrier()
    end_process_group()
