"""The edit store: edited training images keyed by (camera, frame), kept under the run's output directory.

Editing methods (instruct4d, unified-edit) replace training images as they go. Edits are PNG files under
``<run>/edits/`` (never over the dataset), written as soon as they are made so memory holds none of them, with an
``index.json`` mapping each dataset image index to its (camera, frame) key and file. A checkpoint records the store's
directory and index (``state``); resuming from it copies the earlier run's edits into the new run's store, so a
resumed run sees exactly the dataset it was trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

Key = Tuple[int, int]


class EditStore:
    """Edited images on disk, looked up by dataset image index."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: Dict[int, Dict] = {}
        index = self.root / "index.json"
        if index.exists():
            self._index = {int(k): v for k, v in json.loads(index.read_text()).items()}
        self.version = 0
        """Incremented on every write, so datasets know when cached images are stale."""

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_idx: int) -> bool:
        return image_idx in self._index

    def path_for(self, key: Key) -> Path:
        camera, frame = key
        return self.root / f"cam{camera:02d}" / f"frame{frame:05d}.png"

    def put(self, image_idx: int, key: Key, image: np.ndarray) -> Path:
        """Stores an edited image ([H, W, 3] or with alpha [H, W, 4]; uint8, or float in [0, 1]) for dataset image
        ``image_idx``."""
        if image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        self._index[image_idx] = {"camera": key[0], "frame": key[1], "file": str(path.relative_to(self.root))}
        self._write_index()
        self.version += 1
        return path

    def get(self, image_idx: int) -> Optional[np.ndarray]:
        """The edited image for ``image_idx`` as [H, W, 3] uint8 ([H, W, 4] if stored with alpha), or None if it was
        never edited."""
        entry = self._index.get(image_idx)
        if entry is None:
            return None
        with Image.open(self.root / entry["file"]) as im:
            return np.array(im.convert("RGBA" if "A" in im.getbands() else "RGB"))  # writable: nerfstudio wraps it

    def state(self) -> Dict:
        """What a checkpoint keeps: where the edits are and which images they replace."""
        return {"root": str(self.root), "index": {str(k): v for k, v in self._index.items()}}

    def restore(self, state: Dict) -> None:
        """Takes over the edits recorded in a checkpoint's ``state`` (copying them if they live elsewhere)."""
        source = Path(state["root"])
        for key, entry in state["index"].items():
            src, dst = source / entry["file"], self.root / entry["file"]
            if src.resolve() != dst.resolve():
                if not src.exists():
                    raise FileNotFoundError(f"checkpoint refers to edited image {src}, which no longer exists")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            self._index[int(key)] = entry
        self._write_index()
        self.version += 1

    def _write_index(self) -> None:
        tmp = self.root / "index.json.tmp"
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(self._index.items())}, indent=1))
        tmp.replace(self.root / "index.json")
