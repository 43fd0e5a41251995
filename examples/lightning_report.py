"""A Lightning fit on 6,000 MNIST images (a 784-256-128-10 sigmoid net, SGD, 3 epochs), recorded
by gradlab's GradlabCallback (pip install 'gradlab[lightning]'); MNIST from $GRADLAB_DATA.

    python examples/lightning_report.py results/lit && gradlab report results/lit
"""
import os
import sys

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from gradlab.integrations.lightning import GradlabCallback


class MNISTNet(L.LightningModule):
    def __init__(self, hidden=(256, 128), lr=0.5):
        super().__init__()
        self.save_hyperparameters()
        sizes, layers = (784, *hidden, 10), [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(a, b)] + ([nn.Sigmoid()] if i < len(sizes) - 2 else [])
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss


    def validation_step(self, batch, i):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


torch.manual_seed(0)
root, tf = os.environ.get("GRADLAB_DATA", "data"), transforms.ToTensor()
train = Subset(datasets.MNIST(root, train=True, transform=tf), range(6000))
val = Subset(datasets.MNIST(root, train=False, transform=tf), range(1000))
cb = GradlabCallback(sys.argv[1], log_every=5, name="lit-mnist", overwrite=True)
trainer = L.Trainer(max_epochs=3, callbacks=[cb], logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(MNISTNet(), DataLoader(train, batch_size=64, shuffle=True),
            DataLoader(val, batch_size=500))
