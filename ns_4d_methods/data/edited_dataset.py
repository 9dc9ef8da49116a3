"""Training images as the editing methods see them: an edited image, where one exists, replaces the original."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np
import numpy.typing as npt
import torch

from ns_4d_methods.data.edit_store import EditStore
from ns_4d_methods.data.n3dv_dataparser import N3DVFrameDataset


class EditedFrameDataset(N3DVFrameDataset):
    """Frames from files or videos (streamed), overlaid with the edits in ``edit_store``.

    The original frames stay reachable through :meth:`original_image` (editors condition on them and compute optical
    flow on them); nerfstudio's dataloaders only ever see the current, possibly edited, images.
    """

    edit_store: Optional[EditStore] = None

    def get_numpy_image(self, image_idx: int) -> npt.NDArray[np.uint8]:
        if self.edit_store is not None and image_idx in self.edit_store:
            edited = self.edit_store.get(image_idx)
            assert edited is not None
            return edited
        return super().get_numpy_image(image_idx)

    @contextlib.contextmanager
    def _originals(self) -> Iterator[None]:
        store, self.edit_store = self.edit_store, None
        try:
            yield
        finally:
            self.edit_store = store

    def original_image(self, image_idx: int) -> torch.Tensor:
        """The unedited image [H, W, 3] float32 in [0, 1], alpha composited as for training."""
        with self._originals():
            return self.get_image_float32(image_idx)[..., :3]

    def original_alpha(self, image_idx: int) -> Optional[npt.NDArray[np.uint8]]:
        """The unedited image's alpha channel [H, W, 1] uint8, or None for images without one."""
        with self._originals():
            image = self.get_numpy_image(image_idx)
        return image[..., 3:] if image.shape[-1] == 4 else None

    def current_image(self, image_idx: int) -> torch.Tensor:
        """The image training uses now (edited or original), [H, W, 3] float32 in [0, 1]."""
        return self.get_image_float32(image_idx)[..., :3]
