"""--load_in_4bit (QLoRA): an NF4 base from bitsandbytes, LoRA in float32, per-example gradients
exact (docs/DESIGN.md 2.1: the per-example rules only touch the LoRA linears). bitsandbytes' CPU
backend runs NF4 layers, so these run on CPU where bitsandbytes is installed; it is optional
(docs/distributed.md: 4-bit bases) and the tests that need it skip, saying so, where it is not. The GPU run of
the same exactness check is in scripts/gpu_check.py (section qlora)."""

import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import train_args, write_records

NO_BNB = "bitsandbytes is not installed (optional: pip install bitsandbytes==0.50.2); its CPU backend runs these"


def _has_bnb():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


needs_bnb = pytest.mark.skipif(not _has_bnb(), reason=NO_BNB)


@needs_bnb
def test_4bit_base_with_float32_lora_gives_exact_per_example_gradients(tiny_llama):
    from bitsandbytes.nn import Linear4bit

    from scripts.gpu_check import make_batch, same_batch_exactness
    from utils.lora_utils import add_lora
    from utils.model.model_utils import load_model_4bit

    model = add_lora(load_model_4bit(tiny_llama, "no", device="cpu"), 8, 8, seed=0)
    quantised = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantised) == 2 * 7 and all(m.weight.quant_type == "nf4" for m in quantised)  # q,k,v,o,gate,up,down
    assert all(m.compute_dtype == torch.bfloat16 for m in quantised)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    with torch.no_grad():  # B starts at zero, which would make every A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = make_batch(4, 24, model.config.vocab_size, torch.device("cpu"), ragged=True)
    worst = same_batch_exactness(model.train(), batch, None)
    print(f"4-bit base: max over records of relative difference to autograd of the record's own loss: {worst:.3g}")
    assert worst < 1e-5


@needs_bnb
def test_an_evaluation_forward_leaves_training_gradients_as_they_were(tiny_llama):
    """bitsandbytes 0.50.2 repacks NF4 weights for a CPU kernel without backward at the first eval
    forward (AVX512-bf16 CPUs): gradients through the base would then vanish without an error."""
    from utils.lora_utils import add_lora
    from utils.model.model_utils import load_model_4bit

    model = add_lora(load_model_4bit(tiny_llama, "no", device="cpu"), 4, 4, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    ids = torch.randint(2, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    first = next(p for name, p in model.named_parameters() if "layers.0." in name and "lora_A" in name)

    def gradient():
        model.train()
        return torch.autograd.grad(model(input_ids=ids).logits.float().logsumexp(-1).sum(), first)[0]

    before = gradient()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert torch.equal(gradient(), before) and before.abs().sum() > 0


@needs_bnb
def test_train_clm_with_load_in_4bit(tiny_llama, text_records, tmp_path):
    """A private run on the 4-bit base trains every adapted layer, and its report states the epsilon
    of exactly its own mechanism: 2 steps at q = 4/24, sigma 1 with the loss released beside it."""
    import json

    from transformers import AutoModelForCausalLM

    import train_clm
    from utils.lora_utils import attention_linears, load_adapter
    from utils.privacy.accounting import compute_epsilon, effective_noise_multiplier
    from utils.privacy.plan import LOSS_NOISE_RATIO

    data = write_records(tmp_path / "d.jsonl", text_records[:24], jsonl=True)
    out = tmp_path / "out"
    sizes = dict(block_size=48, per_device_train_batch_size=4, max_train_steps=2, lora_r=4, lora_alpha=8)
    dp = dict(clip_norm=1, noise_multiplier=1, delta=1e-3)
    train_clm.main(train_args(tiny_llama, data, out, load_in_4bit=True, **sizes, **dp))

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapted = attention_linears(base)  # the default targets: q, k, v, o of both layers
    trained = load_adapter(base, str(out))
    lora_b = {
        name.removeprefix("base_model.model.").removesuffix(".lora_B.default.weight"): p
        for name, p in trained.named_parameters()
        if "lora_B" in name
    }
    assert sorted(lora_b) == adapted and len(adapted) == 2 * 4
    # B starts at zero; each step adds Gaussian noise to every coordinate's gradient and AdamW
    # moves each coordinate by about the learning rate: every entry of every B has left zero
    assert all(bool((p != 0).all()) for p in lora_b.values())

    report = json.loads((out / "privacy_report.json").read_text())
    assert report["steps"] == 2 and report["noise_multiplier"] == 1 and report["delta"] == 1e-3
    assert report["sampling_rate"] == pytest.approx(4 / 24)
    sigma = effective_noise_multiplier(1.0, LOSS_NOISE_RATIO * 1.0)  # the gradient and the released loss
    assert report["epsilon"] == pytest.approx(compute_epsilon(sigma, 4 / 24, 2, 1e-3), rel=1e-6)


def _args(**kw):
    base = dict(
        model_name_or_path="unused",
        block_size=32,
        keep_base_dropout=False,
        gradient_ckpt=False,
        lora_r=4,
        lora_alpha=4,
        lora_dropout=0.0,
        lora_freeze_a=False,
        lora_target_modules=None,
        seed=0,
        fsdp=False,
        load_in_4bit=True,
    )
    return SimpleNamespace(**{**base, **kw})


def test_without_bitsandbytes_the_error_says_how_to_install_it(tiny_llama, monkeypatch):
    from accelerate import Accelerator

    from utils.cli import UserInputError
    from utils.model.model_utils import build_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserInputError, match=r"--load_in_4bit needs bitsandbytes: pip install bitsandbytes==") as err:
        build_model(_args(model_name_or_path=tiny_llama), Accelerator(cpu=True), None)
    assert "\n" not in str(err.value)


@needs_bnb
def test_a_backend_that_cannot_run_4bit_is_a_clear_error(monkeypatch):
    import bitsandbytes

    from utils.cli import UserInputError
    from utils.model.model_utils import check_4bit_backend

    def broken(*args, **kwargs):
        raise NotImplementedError("no kernel for this device\nsecond line")

    monkeypatch.setattr(bitsandbytes.nn, "Linear4bit", broken)
    with pytest.raises(UserInputError, match=r"cannot run 4-bit layers on cpu \(no kernel for this device\)$"):
        check_4bit_backend("cpu")


def test_4bit_with_fsdp_is_refused(tiny_llama, monkeypatch):
    from accelerate import Accelerator

    import utils.model.model_utils as model_utils
    from utils.cli import UserInputError

    monkeypatch.setattr(model_utils, "fsdp_requested", lambda flag, accelerator: True)
    with pytest.raises(UserInputError, match="--load_in_4bit with FSDP.*accelerate_config_nofsdp.cfg"):
        model_utils.build_model(_args(model_name_or_path=tiny_llama, fsdp=True), Accelerator(cpu=True), None)
