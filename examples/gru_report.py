"""A GRU text classifier of the user's own (embedding -> GRU -> Linear -> tanh -> Linear, Adam
plus StepLR) on synthetic tokens, recorded by gradlab.watch with its loss and accuracy logged.

    python examples/gru_report.py results/gru && gradlab report results/gru
"""
import sys

import torch
from torch import nn
from torch.nn import functional as F

import gradlab

out = sys.argv[1]
torch.manual_seed(0)

class TextGRU(nn.Module):
    def __init__(self, vocab=200, emb=32, hidden=48, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.gru = nn.GRU(emb, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 32)
        self.head = nn.Linear(32, classes)
    def forward(self, tokens):
        seq, _ = self.gru(self.embed(tokens))
        return self.head(torch.tanh(self.fc(seq[:, -1])))

model = TextGRU()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
x = torch.randint(0, 200, (512, 24))
y = x[:, :4].sum(1) % 4  # the class: the first four tokens' sum, mod 4
with gradlab.watch(model, opt, log_every=5, modules=(nn.GRU, nn.Linear),
                   activations={"fc": "tanh"}) as rec:
    for step in range(120):
        i = torch.randint(0, 512, (64,))
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        rec.log(loss=loss.item())
        if step % 20 == 19:
            with torch.no_grad():
                acc = (model(x).argmax(1) == y).float().mean().item()
            rec.log(split="test", accuracy=acc)
rec.save(out, name="gru-text", config={"model": "TextGRU", "batch": 64, "sched": "StepLR(40, 0.5)",
                                       "lr": 3e-3}, overwrite=True)
