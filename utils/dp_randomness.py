"""DP randomness (docs/DESIGN.md 2.7): the secret seed of Poisson sampling and noise, shared by all
processes, a fresh generator per (purpose, step); and noise from the OS's cryptographic generator."""

import hashlib
import math
import os
import secrets
import warnings

import torch
import torch.distributed as dist

from utils.dist_utils import world_size


class DPRandomness:
    """Generators for Poisson sampling and noise, derived from one secret seed.

    The seed comes from the operating system (never from --seed) and is broadcast from process 0
    so every process draws the same sample. Deriving a generator per (purpose, step) means the
    draws depend only on the seed and the step: not on the number of processes, and a resumed run
    (with --insecure_dp_seed) continues the same sequence without saving generator state."""

    def __init__(self, insecure_seed=None, device="cpu"):
        if insecure_seed is None:
            seed = secrets.randbits(63)
        else:
            warnings.warn(
                f"--insecure_dp_seed {insecure_seed}: sampling and noise are reproducible by anyone "
                "who knows this seed; use it for testing only, never for a release",
                stacklevel=2,
            )
            seed = int(insecure_seed)
        self.seed = _broadcast_int(seed)
        self.device = torch.device(device)

    def generator(self, purpose: str, step: int, device: str | None = None) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{purpose}:{step}".encode()).digest()
        gen = torch.Generator(device=device or "cpu")
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen


def _broadcast_int(value):
    if world_size() == 1:
        return value
    obj = [value]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def secure_gaussian(shape: tuple, std: float, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """N(0, std^2) from the operating system's cryptographically secure generator.

    Uniforms are 53-bit integers from os.urandom, turned into normals by Box-Muller in float64.
    Against floating-point attacks on Gaussian samplers (Mironov 2012; Holohan and Braghin 2021),
    each value is the sum of four such draws halved (variance std^2 again), which leaves no
    single draw's rounding pattern visible: the mitigation Opacus' secure_mode applies."""
    n = math.prod(shape)
    pairs = 2 * n  # each pair of uniforms gives two normals: 4 normals per output value
    bits = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64).view(2, pairs)
    uniform = ((bits >> 11) & ((1 << 53) - 1)).double() * 2.0**-53  # [0, 1)
    radius = torch.sqrt(-2.0 * torch.log1p(-uniform[0]))  # 1 - u in (0, 1]: log stays finite
    angle = 2 * math.pi * uniform[1]
    normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)]).view(4, n)
    return (normals.sum(0) * (std / 2)).view(shape).to(device=device, dtype=dtype)
