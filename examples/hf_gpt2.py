"""A HuggingFace GPT-2 built from a config (no weights), on the standard library's text.

``autoscale tune examples/hf_gpt2.py --budget 1GiB --trials 5``. Needs ``transformers``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from text import VOCAB_SIZE, CharBatches


def build(batch_size: int = 8, block_size: int = 64, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=block_size, n_embd=128, n_layer=4, n_head=4,
        bos_token_id=0, eos_token_id=0,
        use_cache=False,  # the KV cache is for generation; it blocks graph capture
    )
    model = GPT2LMHeadModel(config)
    x, _ = CharBatches(block_size=block_size, seed=seed).get(batch_size)
    # HF shifts labels inside the model, so labels are the inputs themselves.
    return model, {"input_ids": x, "labels": x.clone()}
