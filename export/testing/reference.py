"""The reference InternVL image preprocessing (model card `load_image`), in numpy + Pillow.

`find_closest_aspect_ratio` and `dynamic_preprocess` are the model card's code unchanged (the
Python `set` iteration order they depend on included). `build_transform` is replaced by
`to_tensor_normalize`, which performs the same float32 operations as torchvision's
`Resize((s, s), BICUBIC)` (a no-op copy on the s x s tiles) + `ToTensor()` + `Normalize(mean,
std)`, so torchvision is not needed. The Rust runtime (`crates/internvl/src/media/image/`) must reproduce
`load_image` bit for bit, and the golden scripts take their pixels from here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:  # noqa: SIM102 (model card code, kept literal)
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Candidate grids in the reference order (stable sort of a Python set by tile count)."""
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    }
    return sorted(ratios, key=lambda x: x[0] * x[1])


def closest_grid(
    width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448
):
    """The `(cols, rows)` grid `dynamic_preprocess` picks for a `width` x `height` image."""
    ratios = target_ratios(min_num, max_num)
    return find_closest_aspect_ratio(width / height, ratios, width, height, image_size)


def dynamic_preprocess(
    image, min_num=1, max_num=12, image_size=448, use_thumbnail=False
):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    # calculate the existing image aspect ratio
    ratios = target_ratios(min_num, max_num)

    # find the closest aspect ratio to the target
    target_aspect_ratio = find_closest_aspect_ratio(
        aspect_ratio, ratios, orig_width, orig_height, image_size
    )

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images


def to_tensor_normalize(image: Image.Image, input_size: int = 448) -> np.ndarray:
    """`build_transform(input_size)(image)` as a float32 [3, s, s] array.

    torchvision's `Resize` on a PIL image is `image.resize(size, BICUBIC)`, which Pillow turns
    into a copy when the size already matches; `ToTensor` is `uint8 -> float32 / 255` and
    `Normalize` is `(x - mean) / std` with float32 mean and std, all IEEE float32 operations
    that numpy performs identically.
    """
    image = image.convert("RGB").resize(
        (input_size, input_size), Image.Resampling.BICUBIC
    )
    x = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)
    std = np.array(IMAGENET_STD, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def open_rgb(image_file, apply_exif: bool = False) -> Image.Image:
    """`Image.open(image_file).convert('RGB')`, optionally after `ImageOps.exif_transpose`."""
    image = Image.open(image_file)
    if apply_exif:
        image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def _tiles(image: Image.Image, input_size: int, max_num: int, min_num: int) -> list[Image.Image]:
    return dynamic_preprocess(image, min_num=min_num, image_size=input_size, use_thumbnail=True, max_num=max_num)


def tiles_uint8(
    image: Image.Image, input_size: int = 448, max_num: int = 12, min_num: int = 1
) -> np.ndarray:
    """The uint8 tiles (thumbnail included) as [n, s, s, 3], before normalisation."""
    images = _tiles(image, input_size, max_num, min_num)
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


def load_image(
    image_file, input_size=448, max_num=12, min_num=1, apply_exif=False
) -> np.ndarray:
    """The reference `load_image`: float32 pixel values [n, 3, input_size, input_size]."""
    images = _tiles(open_rgb(image_file, apply_exif), input_size, max_num, min_num)
    return np.stack([to_tensor_normalize(im, input_size) for im in images]).astype(
        np.float32, copy=False
    )
