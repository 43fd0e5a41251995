"""Two models of real training code for the benchmarks: a GPT in nanoGPT's shape (4 blocks,
d_model 128) and an LSTM language model, each on random tokens, with logits flattened so that
the benchmark's one loop (``F.cross_entropy(model(x), y)``) trains them."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, CONTEXT = 512, 64


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.c_attn(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, heads)
        self.ln_2, self.mlp = nn.LayerNorm(d), MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's model at 4 blocks of d_model 128 and 4 heads (no dropout, untied head)."""

    def __init__(self, blocks: int = 4, d: int = 128, heads: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(CONTEXT, d)
        self.h = nn.ModuleList([Block(d, heads) for _ in range(blocks)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x)).view(-1, VOCAB)


class LSTMLanguageModel(nn.Module):
    """pytorch/examples' word_language_model in small: embedding, one LSTM, a decoder."""

    def __init__(self, d: int = 128, hidden: int = 256):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Embedding(VOCAB, d)
        self.rnn = nn.LSTM(d, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.encoder(idx))
        return self.decoder(out).reshape(-1, VOCAB)


def lm_batches(steps: int, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random token sequences and their next tokens (flattened)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (batch, CONTEXT + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:].reshape(-1)))
    return out


def gpt_activations(blocks: int = 4) -> dict[str, str]:
    """The activation after each block's ``c_fc`` (nanoGPT calls GELU in forward)."""
    return {f"h.{i}.mlp.c_fc": "gelu" for i in range(blocks)}
