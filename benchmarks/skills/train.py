"""Training the skills benchmark's tiny decoder: pretraining on a mixture, light fine-tunes.

A transformers Llama (2 layers, hidden 64), random init, trained with AdamW on the
answer tokens of generated examples (the prompt's letters are random, so predicting them
teaches nothing). Seeded throughout and deterministic on CPU.
"""

from __future__ import annotations

import os
import random

import torch

from tasks import CHARS, training_batch, write_char_tokenizer

VOCAB = 3 + len(CHARS)


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)


def new_model(seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(model_config())


def encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels: the labels are the answer tokens (after '='), -100 elsewhere."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    eq = tokenizer.convert_tokens_to_ids("=")
    longest = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        start = r.index(eq) + 1
        labels[i, start:len(r)] = torch.tensor(r[start:])
    return ids, labels


def train(model, tokenizer, mixture: dict[str, float], steps: int, lr: float, seed: int, reserved: set[str],
          batch: int = 64, warmup: int = 50) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss of every 50th step."""
    import math

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    losses = []
    for step in range(steps):
        ids, labels = encode(tokenizer, training_batch(rng, mixture, batch, reserved))
        loss = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def save(model, folder: str) -> str:
    """A model folder dmerge reads: float32 safetensors, config.json and the tokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Writing model shards" bar, for a 0.4 MB model
    model.save_pretrained(folder, safe_serialization=True)
    write_char_tokenizer(folder)
    return folder


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
