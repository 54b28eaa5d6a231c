"""A plain wandb-style training script, as users already have them; tests run it with its import line changed."""

import argparse

import torch
import wandb
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()

wandb.init(project="regression", name="wandb-style", config=args)
config = wandb.config

torch.manual_seed(0)
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=config.lr)
wandb.watch(model, log="all")
target = torch.randn(4, 1)
for epoch in range(config.epochs):
    for _ in range(10):
        x = torch.randn(32, 4)
        loss = (model(x) - x @ target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        wandb.log({"train/loss": loss.item(), "epoch": epoch})
    with torch.no_grad():
        x = torch.randn(256, 4)
        val = (model(x) - x @ target).pow(2).mean()
    wandb.log({"val/loss": val.item(), "examples": wandb.Image(torch.rand(3, 8, 8), caption="noise")})
wandb.config.update({"final_val": float(val)})
wandb.finish()
