"""SimMIM mask generator: a random set of mask-patch cells, expanded to the model's patch grid.

With input 192, mask patch 32, model patch 4 and ratio 0.6 the grid is 6x6 = 36 cells,
ceil(36 * 0.6) = 22 of them are masked, and each cell covers 8x8 model patches, giving
a (48, 48) bool mask, True = masked (the SimMIM paper's recipe).
"""

from __future__ import annotations

import math
import random

import numpy as np


class MaskGenerator:
    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6):
        if input_size % mask_patch_size:
            raise ValueError(f"img_size={input_size} is not a multiple of mask_patch_size={mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(f"mask_patch_size={mask_patch_size} is not a multiple of model_patch_size={model_patch_size}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} must lie in [0, 1]")
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.rand_size = input_size // mask_patch_size          # cells per side
        self.scale = mask_patch_size // model_patch_size        # model patches per cell side
        self.token_count = self.rand_size ** 2
        self.mask_count = int(math.ceil(self.token_count * mask_ratio))

    @property
    def shape(self) -> tuple[int, int]:
        side = self.rand_size * self.scale
        return side, side

    def __call__(self, rng: random.Random) -> np.ndarray:
        """(input/model_patch, input/model_patch) bool array; True where masked."""
        cells = np.zeros(self.token_count, dtype=bool)
        cells[rng.sample(range(self.token_count), self.mask_count)] = True
        cells = cells.reshape(self.rand_size, self.rand_size)
        return cells.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

    def __repr__(self) -> str:
        return (f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
                f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})")
