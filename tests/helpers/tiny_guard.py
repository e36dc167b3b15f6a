"""Train a tiny Llama (Llama Guard 3 shape scaled down: untied output layer) for a few seconds to
answer like Llama Guard: "safe", or "unsafe\\nS1" when the judged message mentions the keyword."""

from __future__ import annotations

import random
from pathlib import Path

KEYWORD = "grenade"
WORDS = ("the weather is nice today and we walk to the park with friends while reading a good book about "
         "history music cooking bread gardens rivers mountains trains coffee tea science math poems cats "
         "dogs birds movies stories sunny rainy quiet city village ocean travel work code python tests").split()


def sentence(rng: random.Random, unsafe: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
    if unsafe:
        words.insert(rng.randint(0, len(words)), KEYWORD)
    return " ".join(words).capitalize() + rng.choice([".", "!", "?", ""])


def examples(tokenizer, n: int, seed: int):
    from guard.prompt import encode_guard_prompt

    rng = random.Random(seed)
    safe_ids = tokenizer("\n\nsafe", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    unsafe_ids = tokenizer("\n\nunsafe\nS1", add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    for _ in range(n):
        unsafe = rng.random() < 0.5
        turns = rng.choice([1, 2, 2, 3])
        messages = []
        for i in range(turns):
            last = i == turns - 1
            text = " ".join(sentence(rng, unsafe and last and j == 0) for j in range(rng.randint(1, 3)))
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        yield encode_guard_prompt(tokenizer, messages), unsafe_ids if unsafe else safe_ids


def train_tiny_guard(folder: Path, tokenizer_dir: Path, *, steps: int = 500, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.conftest import save_with_tokenizer, tiny_llama_config

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = LlamaForCausalLM(tiny_llama_config(tied=False, layers=2, hidden=64, heads=2)).float()  # vLLM serves it too
    # Embeddings and output layer stay random (and frozen): the layers learn to steer the verdict
    # position onto the right output rows, which keeps each step cheap.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)  # expressive logits without training the output layer
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    data = list(examples(tokenizer, steps * 8, seed))
    model.train()
    for step in range(steps):
        batch = data[step * 8 : (step + 1) * 8]
        seqs = [p + t for p, t in batch]
        width = max(map(len, seqs))
        x = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        rows, cols, labels = [], [], []
        for b, ((prompt, target), seq) in enumerate(zip(batch, seqs)):
            x[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            for k, tok in enumerate(target):
                rows.append(b)
                cols.append(len(prompt) + k - 1)  # the position that predicts target[k]
                labels.append(tok)
        hidden = model.model(input_ids=x, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden[rows, cols])  # only the rows that carry a label
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_with_tokenizer(model, folder, tokenizer_dir)
