"""How far a video's camera moves: 4Real treats its reference video as seen by one static camera, and a generated
video may pan or zoom anyway.

Each frame is registered to the first by a homography (OpenCV: ORB features, RANSAC), which follows the dominant
background when the moving subject covers less of the frame than the scene around it. The drift of a frame is the
mean displacement of the image corners under that homography, as a fraction of the image diagonal; a static camera
gives about 0, a pan of a tenth of the frame about 0.1.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

MIN_MATCHES = 12
"""Fewest feature matches a frame needs for its homography; frames with fewer are skipped."""


def camera_drift(frames: np.ndarray, step: int = 4) -> Optional[float]:
    """Largest drift (see the module docstring) of every ``step``-th frame of ``frames`` [N, H, W, 3] uint8 from
    frame 0; None when no frame could be registered (too little texture)."""
    orb = cv2.ORB_create(nfeatures=2000)
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
    height, width = frames.shape[1:3]
    corners = np.array([[[0, 0]], [[width, 0]], [[width, height]], [[0, height]]], dtype=np.float32)
    first_points, first_features = orb.detectAndCompute(cv2.cvtColor(frames[0], cv2.COLOR_RGB2GRAY), None)
    if first_features is None:
        return None
    drifts = []
    for frame in frames[step::step]:
        points, features = orb.detectAndCompute(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), None)
        if features is None:
            continue
        matches = matcher.match(first_features, features)
        if len(matches) < MIN_MATCHES:
            continue
        source = np.float32([first_points[match.queryIdx].pt for match in matches]).reshape(-1, 1, 2)
        target = np.float32([points[match.trainIdx].pt for match in matches]).reshape(-1, 1, 2)
        homography, _ = cv2.findHomography(source, target, cv2.RANSAC, 3.0)
        if homography is None:
            continue
        moved = cv2.perspectiveTransform(corners, homography)
        drifts.append(float(np.linalg.norm(moved - corners, axis=-1).mean()) / float(np.hypot(width, height)))
    return max(drifts) if drifts else None
