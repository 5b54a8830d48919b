"""Training-split augmentation that a seed and an exact resume reproduce.

Random crops (after zero padding by an eighth of the side: 4 px for 32 px images) and
horizontal flips, with torchvision's v2 functional ops. Their parameters are not drawn from a
global generator but from one number per sample that the shuffling sampler draws with its own
generator right after the epoch's order: a resumed epoch redraws the same numbers, and the
loader path and the on-device path (a whole batch at once) compute the same pictures.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

AUGMENTATIONS = ("none", "crop_flip")
# Draws are taken in [0, DRAW_RANGE): enough for every crop offset and flip of any image size.
DRAW_RANGE = 2**31 - 1


def crop_padding(side: int) -> int:
    return max(1, round(side / 8))


def crop_flip(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images, each padded, cropped back to H × W where its draw says, and flipped
    left-right when its draw says so."""
    count, _, height, width = images.shape
    pad = crop_padding(max(height, width))
    span = 2 * pad + 1
    draws = draws.to(images.device)
    dx, dy, flip = draws % span, (draws // span) % span, (draws // span**2) % 2 == 1
    padded = TF.pad(images, [pad])
    rows = dy[:, None] + torch.arange(height, device=images.device)
    cols = dx[:, None] + torch.arange(width, device=images.device)
    batch = torch.arange(count, device=images.device)[:, None, None]
    # Advanced indexing puts the indexed dimensions first: (B, H, W, C).
    cropped = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], TF.horizontal_flip(cropped), cropped)


class AugmentedSplit(Dataset):
    """A training split whose loader asks for ``(index, draw)`` pairs and gets the sample
    augmented as the draw says."""

    def __init__(self, split: Dataset) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        index, draw = item
        sample = self.split[index]
        if sample is None:  # a file left out while loading
            return None
        image, label = sample
        return crop_flip(image[None], torch.tensor([draw]))[0], label
