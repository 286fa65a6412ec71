"""The built-in synthetic demo: EM-like slices with mitochondria and their masks, deterministic."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

from data import list_images, write_image


DEMO_ROOT = Path("dataset/demo")


DEMO_SPLITS = {"train": 8, "valid": 2, "test": 2}


DEMO_SHAPE = (512, 512)


DEMO_UNLABELED_SHAPES = ((389, 611), (200, 150))


def _smooth_noise(rng, shape, sigma):
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / (noise.std() + 1e-8)


def synthetic_em_slice(rng: np.random.Generator, shape=DEMO_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One EM-like slice and its mitochondria mask: (y, x) uint8 image, uint8 0/1 mask.

    Cells with wavy dark membranes and granular cytoplasm; mitochondria are
    dark elongated ellipses with a darker double membrane and light cristae
    stripes across them. Distractors a model must learn to ignore: dark round
    vesicles without cristae and thick dark myelin-like rings.
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree
    from skimage.segmentation import find_boundaries

    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Cells: a Voronoi tessellation of warped coordinates gives wavy membranes.
    n_cells = max(2, int(height * width / 70**2))
    seeds = rng.uniform([0, 0], [height, width], size=(n_cells, 2))
    warp_y = 6 * _smooth_noise(rng, shape, 12)
    warp_x = 6 * _smooth_noise(rng, shape, 12)
    points = np.stack([(yy + warp_y).ravel(), (xx + warp_x).ravel()], axis=1)
    cells = cKDTree(seeds).query(points)[1].reshape(shape)
    membranes = find_boundaries(cells, mode="thick")

    image = 0.68 + 0.05 * _smooth_noise(rng, shape, 30)
    image += rng.normal(0, 0.05, n_cells)[cells]  # per-cell brightness
    image += 0.05 * _smooth_noise(rng, shape, 1.0)  # granular cytoplasm
    mask = np.zeros(shape, bool)
    inside = ndimage.distance_transform_edt(~membranes)
    roomy = np.argwhere(inside > 8)

    def window(cy, cx, radius):
        """Slices of a square around (cy, cx), clipped to the image."""
        radius = int(math.ceil(radius))
        return np.s_[max(0, int(cy) - radius) : int(cy) + radius + 1, max(0, int(cx) - radius) : int(cx) + radius + 1]

    for _ in range(int(n_cells * 1.6)):  # mitochondria, not touching each other
        a, b, angle = rng.uniform(12, 30), rng.uniform(5, 10), rng.uniform(0, np.pi)
        cy, cx = roomy[rng.integers(len(roomy))]
        if inside[cy, cx] <= b + 3:
            continue
        box = window(cy, cx, a + 3)
        y, x = yy[box] - cy, xx[box] - cx
        u = y * np.sin(angle) + x * np.cos(angle)  # along the major axis
        v = y * np.cos(angle) - x * np.sin(angle)
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        body = (r <= 1.0) & (cells[box] == cells[cy, cx]) & (inside[box] > 2)
        if body.sum() < 40 or (ndimage.binary_dilation(body, iterations=3) & mask[box]).any():
            continue
        cristae = 0.5 + 0.5 * np.sin(2 * np.pi * u / rng.uniform(5, 8) + rng.uniform(0, 2 * np.pi))
        shade = 0.32 + 0.14 * cristae + 0.03 * rng.standard_normal()
        image[box][body] = shade[body]
        image[box][body & (r > 0.8)] = 0.2  # the darker double membrane
        mask[box] |= body
    for _ in range(int(n_cells * 1.2)):  # dark round vesicles: not mitochondria
        radius = rng.uniform(3, 7)
        cy, cx = rng.uniform([0, 0], [height, width])
        box = window(cy, cx, radius)
        blob = (yy[box] - cy) ** 2 + (xx[box] - cx) ** 2 <= radius**2
        image[box][blob & ~mask[box]] = 0.3
    for _ in range(max(1, n_cells // 8)):  # thick myelin-like rings: not mitochondria
        radius, thickness = rng.uniform(18, 35), rng.uniform(4, 7)
        cy, cx = rng.uniform([0, 0], [height, width])
        box = window(cy, cx, radius + thickness)
        distance = np.sqrt((yy[box] - cy) ** 2 + (xx[box] - cx) ** 2)
        ring = np.abs(distance - radius) <= thickness / 2
        image[box][ring & ~mask[box]] = 0.22
    image[membranes & ~mask] = 0.3
    image = ndimage.gaussian_filter(image, 0.8) + rng.normal(0, 0.035, shape)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8)


def make_demo_dataset(root: str | os.PathLike = DEMO_ROOT, seed: int = 2015, shape=DEMO_SHAPE, splits=None) -> Path:
    """Write the deterministic synthetic demo dataset in our layout (labels 0/255).

    Also writes ``unlabeled/`` with odd-sized slices for the prediction demo.
    Files are written atomically; existing files are left alone.
    """
    from tqdm import tqdm

    root = Path(root)
    splits = splits or DEMO_SPLITS
    progress = tqdm(total=sum(splits.values()) + len(DEMO_UNLABELED_SHAPES), desc="demo data", unit="slice",
                    file=sys.stderr, leave=False)
    index = 0
    for split, count in splits.items():
        for kind in ("images", "labels"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            image_path = root / split / "images" / f"{index:04d}.png"
            label_path = root / split / "labels" / f"{index:04d}.png"
            if not (image_path.exists() and label_path.exists()):
                image, mask = synthetic_em_slice(np.random.default_rng([seed, index]), shape)
                write_image(label_path, mask * 255)
                write_image(image_path, image)
            index += 1
            progress.update()
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    for unlabeled_shape in DEMO_UNLABELED_SHAPES:
        path = root / "unlabeled" / f"{index:04d}.png"
        if not path.exists():
            write_image(path, synthetic_em_slice(np.random.default_rng([seed, index]), unlabeled_shape)[0])
        index += 1
        progress.update()
    progress.close()
    return root


def demo_is_complete(root: str | os.PathLike = DEMO_ROOT) -> bool:
    root = Path(root)
    expected = sum(DEMO_SPLITS.values())
    found = sum(len(list_images(root / split / "images")) for split in DEMO_SPLITS if (root / split / "images").is_dir())
    return found == expected and (root / "unlabeled").is_dir()
