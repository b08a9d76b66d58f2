"""Run train_clm.main in a launched process (torchrun / accelerate launch) and report, per rank, how
the model's parameters were held: the frozen base sharded, the LoRA parameters whole and plain.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py <train_clm.py arguments> --fsdp

Writes $FSDP_WORKER_REPORT/rank<r>.json. Also checks that the replica agreement check catches a
one-ulp drift of one process's adapter (after training, so the saved adapter is unaffected)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import train_clm  # noqa: E402
from utils.fsdp_utils import assert_replicas_agree, shard_summary  # noqa: E402

captured = {}
_real_shard = train_clm.shard_frozen_base


def _spy(model, *args, **kwargs):
    result = _real_shard(model, *args, **kwargs)
    captured["model"] = model
    captured["after_wrap"] = shard_summary(model)
    return result


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


if __name__ == "__main__":
    train_clm.shard_frozen_base = _spy
    train_clm.main(sys.argv[1:])
    rank = dist.get_rank()
    report = {"rank": rank, "world_size": dist.get_world_size(), "sharded": "model" in captured}
    if "model" in captured:
        report["after_wrap"] = captured["after_wrap"]
        report["after_training"] = shard_summary(captured["model"])
        report["drift_detected"] = drift_is_detected(captured["model"])
    folder = os.environ["FSDP_WORKER_REPORT"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=2)
    dist.barrier()
