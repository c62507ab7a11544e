"""A tiny residual CNN without BatchNorm, for distributed-training tests (per-rank BatchNorm
statistics would make two ranks differ from one process by design)."""

from torch import nn


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.act(x + self.conv2(self.act(self.conv1(x))))


class Tiny(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, num_classes)
        self.default_input_size = (3, 32, 32)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def tiny(num_classes: int = 10) -> Tiny:
    return Tiny(num_classes)
