"""The reference's multi-view pipeline steps, on one frame of N cameras.

Each step is a small callable ``step(frame, rng) -> frame`` (``rng`` a ``numpy.random.Generator``,
unused by deterministic steps) acting on a :class:`Frame`. Matrices are float64 here; the dataset
casts to float32 at the end. 3D boxes are (x, y, z_gravity, x_size, y_size, z_size, yaw, vx, vy) in
the LiDAR frame (mmdet3d ``LiDARInstance3DBoxes`` axes); 2D labels are per camera in pixels of the
current image.

Reference: ``projects/mmdet3d_plugin/datasets/pipelines/transform_3d.py`` (ResizeCropFlipRotImage,
GlobalRotScaleTransImage, NormalizeMultiviewImage, PadMultiViewImage) and mmdet3d-rc6
``ObjectRangeFilter`` / ``ObjectNameFilter``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "Frame",
    "ObjectRangeFilter",
    "ObjectNameFilter",
    "ResizeCropFlipRotImage",
    "GlobalRotScaleTransImage",
    "ImageAugmentation",
    "filter_occluded_boxes",
    "resize_crop",
    "normalize_images",
    "pad_images",
    "limit_yaw",
]

MIN_BOX_SIZE_2D = 2.0  # px, the reference's ResizeCropFlipRotImage.min_size
# How camera images become the network's input size (the dataset's ``resize_path``):
RESIZE_PATHS = {
    "reference": "decode at full size, resize the whole image, crop (the reference's pixels)",
    "cropped": "decode at full size, resample only the pixels the crop keeps (a pixel value moves by 1-2 "
               "levels in about 0.1% of values: PIL takes the source box in float32)",
    "draft": "as cropped, from a JPEG decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers "
             "the resized size (the decoder's downscaling instead of the bicubic filter's)",
}


@dataclass
class Frame:
    """One sample moving through the pipeline.

    ``images``: N PIL RGB images. Camera matrices (N, 4, 4): ``intrinsics`` (3x3 K in the top-left),
    ``extrinsics`` (LiDAR -> camera), ``lidar2img``. Poses (4, 4): ``ego_pose`` (LiDAR -> global) and
    ``ego_pose_inv``. Targets are ``None`` when the frame carries no labels.
    """

    images: List[Image.Image]
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    lidar2img: np.ndarray
    ego_pose: np.ndarray
    ego_pose_inv: np.ndarray
    boxes_3d: Optional[np.ndarray] = None  # (n, 9)
    labels_3d: Optional[np.ndarray] = None  # (n,) int64, -1 = not a recipe class
    bboxes_2d: Optional[List[np.ndarray]] = None  # N x (m, 4) x1, y1, x2, y2
    labels_2d: Optional[List[np.ndarray]] = None  # N x (m,)
    centers_2d: Optional[List[np.ndarray]] = None  # N x (m, 2)
    depths: Optional[List[np.ndarray]] = None  # N x (m,)

    def keep_boxes_3d(self, keep: np.ndarray) -> None:
        self.boxes_3d = self.boxes_3d[keep]
        self.labels_3d = self.labels_3d[keep]


def limit_yaw(yaw: np.ndarray, offset: float = 0.5, period: float = 2 * math.pi) -> np.ndarray:
    """Wrap angles into [-offset * period, (1 - offset) * period) (mmdet3d ``limit_period``)."""
    return yaw - np.floor(yaw / period + offset) * period


class ObjectRangeFilter:
    """Keep 3D boxes whose BEV centre lies strictly inside the range; then wrap yaw into [-pi, pi)."""

    def __init__(self, *, point_cloud_range: Sequence[float]) -> None:
        self.x_min, self.y_min, _, self.x_max, self.y_max, _ = point_cloud_range

    def __call__(self, frame: Frame, rng: np.random.Generator) -> Frame:
        x, y = frame.boxes_3d[:, 0], frame.boxes_3d[:, 1]
        frame.keep_boxes_3d((x > self.x_min) & (y > self.y_min) & (x < self.x_max) & (y < self.y_max))
        frame.boxes_3d[:, 6] = limit_yaw(frame.boxes_3d[:, 6])
        return frame


class ObjectNameFilter:
    """Drop 3D boxes whose class is not one of the recipe's classes (label -1)."""

    def __init__(self, *, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, frame: Frame, rng: np.random.Generator) -> Frame:
        frame.keep_boxes_3d((frame.labels_3d >= 0) & (frame.labels_3d < self.num_classes))
        return frame


@dataclass(frozen=True)
class ImageAugmentation:
    """One draw of the image augmentation, shared by all cameras of a frame."""

    resize: float
    resize_dims: Tuple[int, int]  # (width, height) after resizing
    crop: Tuple[int, int, int, int]  # (x1, y1, x2, y2) box in the resized image
    flip: bool

    def matrix(self) -> np.ndarray:
        """3x3 pixel homography: original image pixels -> augmented image pixels."""
        crop_x, crop_y, crop_x2, _ = self.crop
        ida = np.array([[self.resize, 0.0, -crop_x], [0.0, self.resize, -crop_y], [0.0, 0.0, 1.0]])
        if self.flip:
            ida = np.array([[-1.0, 0.0, crop_x2 - crop_x], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ ida
        return ida


class ResizeCropFlipRotImage:
    """Resize, bottom crop and flip all cameras with one random draw; update K, lidar2img and 2D labels.

    ``resize_path`` (see :data:`RESIZE_PATHS`): ``reference`` resizes whole images, then crops;
    ``cropped`` and ``draft`` resample only the kept pixels (:func:`resize_crop`).

    Training: ``r ~ U(resize_lim)``, crop ``final_dim`` from the bottom (``bot_pct_lim``) at a random
    horizontal offset, flip with probability 1/2 when ``rand_flip``. Test: ``r = test_resize`` or
    ``max(fH / H, fW / W)``, centred horizontally, bottom crop, no flip. 2D labels (training only)
    are scaled, shifted, clipped to the output, dropped below 2 px, flipped, then the occlusion filter
    keeps only boxes visible in a painted depth-ordered index map (the farthest always survives).
    The source image size H x W is taken from the images themselves.
    """

    def __init__(
        self,
        *,
        final_dim: Tuple[int, int],
        resize_lim: Tuple[float, float],
        bot_pct_lim: Tuple[float, float] = (0.0, 0.0),
        rot_lim: Tuple[float, float] = (0.0, 0.0),
        rand_flip: bool = True,
        training: bool = True,
        test_resize: Optional[float] = None,
        filter_invisible: bool = True,
        resize_path: str = "reference",
    ) -> None:
        if tuple(rot_lim) != (0.0, 0.0):
            raise ValueError("image rotation is not supported (the reference asserts rot_lim == (0, 0))")
        self.final_dim = tuple(final_dim)
        self.resize_lim = tuple(resize_lim)
        self.bot_pct_lim = tuple(bot_pct_lim)
        self.rand_flip = rand_flip
        self.training = training
        self.test_resize = test_resize
        self.filter_invisible = filter_invisible
        self.resize_path = resize_path

    def sample(self, image_size: Tuple[int, int], rng: np.random.Generator) -> ImageAugmentation:
        """Draw (training) or compute (test) the augmentation for source images of (width, height)."""
        width, height = image_size
        final_h, final_w = self.final_dim
        if self.training:
            resize = float(rng.uniform(*self.resize_lim))
            new_w, new_h = int(width * resize), int(height * resize)
            crop_h = int((1 - rng.uniform(*self.bot_pct_lim)) * new_h) - final_h
            crop_w = int(rng.uniform(0, max(0, new_w - final_w)))
            flip = bool(self.rand_flip and rng.choice([0, 1]))
        else:
            resize = self.test_resize
            if resize is None:
                resize = max(final_h / height, final_w / width)
            new_w, new_h = int(width * resize), int(height * resize)
            crop_h = int((1 - np.mean(self.bot_pct_lim)) * new_h) - final_h
            crop_w = int(max(0, new_w - final_w) / 2)
            flip = False
        return ImageAugmentation(
            resize=resize,
            resize_dims=(new_w, new_h),
            crop=(crop_w, crop_h, crop_w + final_w, crop_h + final_h),
            flip=flip,
        )

    def __call__(self, frame: Frame, rng: np.random.Generator) -> Frame:
        return self.apply(frame, self.sample(frame.images[0].size, rng))

    def apply(self, frame: Frame, augmentation: ImageAugmentation) -> Frame:
        """Apply one given augmentation to the images, camera matrices and (training) 2D labels."""
        ida = augmentation.matrix()
        images = []
        for image in frame.images:
            if self.resize_path == "reference":
                # PIL fills the part of the crop box outside the resized image with black.
                image = image.resize(augmentation.resize_dims, Image.BICUBIC).crop(augmentation.crop)
            else:
                image = resize_crop(image, augmentation)
            if augmentation.flip:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            images.append(image)
        frame.images = images
        frame.intrinsics = frame.intrinsics.copy()
        frame.intrinsics[:, :3, :3] = ida @ frame.intrinsics[:, :3, :3]
        frame.lidar2img = frame.intrinsics @ frame.extrinsics
        if self.training and frame.bboxes_2d is not None:
            for camera in range(len(frame.images)):
                labels = self._transform_labels(
                    augmentation, frame.bboxes_2d[camera], frame.centers_2d[camera], frame.labels_2d[camera],
                    frame.depths[camera],
                )
                if self.filter_invisible and len(labels[0]):
                    labels = filter_occluded_boxes(*labels, image_hw=self.final_dim)
                (frame.bboxes_2d[camera], frame.centers_2d[camera], frame.labels_2d[camera],
                 frame.depths[camera]) = labels
        return frame

    def _transform_labels(
        self, augmentation: ImageAugmentation, bboxes: np.ndarray, centers: np.ndarray, labels: np.ndarray,
        depths: np.ndarray,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        final_h, final_w = self.final_dim
        crop_x, crop_y = augmentation.crop[:2]
        shift = np.array([crop_x, crop_y], dtype=np.float32)
        bboxes = bboxes * np.float32(augmentation.resize) - np.tile(shift, 2)
        bboxes[:, 0::2] = np.clip(bboxes[:, 0::2], 0, final_w)
        bboxes[:, 1::2] = np.clip(bboxes[:, 1::2], 0, final_h)
        sizes = bboxes[:, 2:] - bboxes[:, :2]
        keep = (sizes[:, 0] >= MIN_BOX_SIZE_2D) & (sizes[:, 1] >= MIN_BOX_SIZE_2D)
        centers = centers * np.float32(augmentation.resize) - shift
        centers[:, 0] = np.clip(centers[:, 0], 0, final_w)
        centers[:, 1] = np.clip(centers[:, 1], 0, final_h)
        if augmentation.flip:
            bboxes[:, [0, 2]] = final_w - bboxes[:, [2, 0]]
            centers[:, 0] = final_w - centers[:, 0]
        return bboxes[keep], centers[keep], labels[keep], depths[keep]


def resize_crop(image: Image.Image, augmentation: ImageAugmentation) -> Image.Image:
    """``image.resize(resize_dims, BICUBIC).crop(crop)`` in one pass over only the pixels the crop keeps.

    PIL resamples a source box to an output size with the filter positions and support of the full
    resize (scale = source size / ``resize_dims``), so the kept pixels come out as the full resize gives
    them, but for PIL taking the box in float32: a filter tap moves by one step of its fixed-point
    weights now and then (1-2 levels in about 0.1% of values). The part of the crop outside the resized
    image stays black, as ``crop`` fills it. The source may be decoded at a reduced size (JPEG draft):
    it then stands for the full image.
    """
    new_w, new_h = augmentation.resize_dims
    x1, y1, x2, y2 = augmentation.crop
    inside = (max(x1, 0), max(y1, 0), min(x2, new_w), min(y2, new_h))  # the crop within the resized image
    out_w, out_h = inside[2] - inside[0], inside[3] - inside[1]
    if out_w <= 0 or out_h <= 0:
        return Image.new(image.mode, (x2 - x1, y2 - y1))
    scale_x, scale_y = image.width / new_w, image.height / new_h
    box = (inside[0] * scale_x, inside[1] * scale_y, inside[2] * scale_x, inside[3] * scale_y)
    resized = image.resize((out_w, out_h), Image.BICUBIC, box=box)
    if (out_w, out_h) == (x2 - x1, y2 - y1):
        return resized
    canvas = Image.new(image.mode, (x2 - x1, y2 - y1))
    canvas.paste(resized, (inside[0] - x1, inside[1] - y1))
    return canvas


def filter_occluded_boxes(
    bboxes: np.ndarray, centers: np.ndarray, labels: np.ndarray, depths: np.ndarray, image_hw: Tuple[int, int]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keep the 2D boxes visible in a depth-ordered index map (reference ``_filter_invisible``).

    Boxes are sorted far to near and painted (integer area ``ceil(x1), ceil(y1)`` to ``floor(x2),
    floor(y2)``) into an (H, W) map of indices, nearer ones overwriting; the survivors are returned
    sorted far to near. The map starts at 0, so the farthest box always survives, as in the reference.
    """
    order = np.argsort(-depths, kind="stable")
    bboxes, centers, labels, depths = bboxes[order], centers[order], labels[order], depths[order]
    pixel_boxes = np.concatenate([np.ceil(bboxes[:, :2]), np.floor(bboxes[:, 2:])], axis=1)
    pixel_boxes = pixel_boxes.astype(np.int64)
    index_map = np.zeros(image_hw, dtype=np.int64)
    for i, (x1, y1, x2, y2) in enumerate(pixel_boxes):
        index_map[y1:y2, x1:x2] = i
    # The indices present in the map, ascending (np.unique's answer, by counting instead of sorting).
    visible = np.flatnonzero(np.bincount(index_map.ravel(), minlength=len(pixel_boxes)))
    return bboxes[visible], centers[visible], labels[visible], depths[visible]


class GlobalRotScaleTransImage:
    """Random BEV rotation, scaling and translation of the LiDAR frame (one draw per frame).

    Points of the new frame are ``p' = T S R p`` with ``R`` the rotation by ``-a`` about z
    (``a ~ U(rot_range)``), ``S = s I`` (``s ~ U(scale_ratio_range)``) and ``T`` a translation drawn
    from N(0, translation_std). ``lidar2img`` and ``ego_pose`` are right-multiplied by the inverse,
    ``ego_pose_inv`` left-multiplied; intrinsics and extrinsics are left unchanged (as the reference).
    Boxes: rotated by ``-a`` when ``reverse_angle`` (centre, yaw, velocity; ``+a`` otherwise, as the
    reference), then centre, size and velocity scaled, then centre translated.
    """

    def __init__(
        self,
        *,
        rot_range: Tuple[float, float] = (-0.3925, 0.3925),
        scale_ratio_range: Tuple[float, float] = (0.95, 1.05),
        translation_std: Tuple[float, float, float] = (0.0, 0.0, 0.0),
        reverse_angle: bool = True,
    ) -> None:
        self.rot_range = tuple(rot_range)
        self.scale_ratio_range = tuple(scale_ratio_range)
        self.translation_std = np.asarray(translation_std, dtype=np.float64)
        self.reverse_angle = reverse_angle

    def __call__(self, frame: Frame, rng: np.random.Generator) -> Frame:
        angle = float(rng.uniform(*self.rot_range))
        scale = float(rng.uniform(*self.scale_ratio_range))
        translation = np.zeros(3)
        if self.translation_std.any():
            translation = rng.normal(scale=self.translation_std, size=3)
        cos, sin = math.cos(angle), math.sin(angle)
        rotation = np.array([[cos, sin, 0, 0], [-sin, cos, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        scaling = np.diag([scale, scale, scale, 1.0])
        shift = np.eye(4)
        shift[:3, 3] = translation
        lidar_change = shift @ scaling @ rotation  # old LiDAR frame -> augmented frame
        change_inv = np.linalg.inv(lidar_change)
        frame.lidar2img = frame.lidar2img @ change_inv
        frame.ego_pose = frame.ego_pose @ change_inv
        frame.ego_pose_inv = lidar_change @ frame.ego_pose_inv
        if frame.boxes_3d is not None and len(frame.boxes_3d):
            boxes = frame.boxes_3d.copy()
            box_angle = -angle if self.reverse_angle else angle
            box_cos, box_sin = math.cos(box_angle), math.sin(box_angle)
            box_rotation = np.array([[box_cos, -box_sin], [box_sin, box_cos]])  # counter-clockwise
            boxes[:, 0:2] = boxes[:, 0:2] @ box_rotation.T
            boxes[:, 7:9] = boxes[:, 7:9] @ box_rotation.T
            boxes[:, 6] += box_angle
            boxes[:, 0:6] *= scale
            boxes[:, 7:9] *= scale
            boxes[:, 0:3] += translation
            frame.boxes_3d = boxes
        return frame


def normalize_images(
    images: Sequence[Image.Image], *, mean: Sequence[float], std: Sequence[float], to_rgb: bool
) -> np.ndarray:
    """(N, 3, H, W) float32 ``(pixel - mean) / std``.

    The reference decodes images as BGR; ``to_rgb=False`` keeps BGR channel order (V2-99 recipe),
    ``to_rgb=True`` uses RGB (R50 recipe). ``mean`` / ``std`` are in that output order.
    """
    # (256, 3): every 8-bit value normalised per output channel, with the same float32 arithmetic as
    # normalising the pixels one by one; the images are then looked up into (N, 3, H, W) directly.
    table = (np.arange(256, dtype=np.float32)[:, None] - np.asarray(mean, dtype=np.float32)) / np.asarray(
        std, dtype=np.float32
    )
    # N x (H, W, 3) uint8
    pixels = [np.asarray(image if image.mode == "RGB" else image.convert("RGB")) for image in images]
    height, width = pixels[0].shape[:2]
    out = np.empty((len(pixels), 3, height, width), dtype=np.float32)
    for index, rgb in enumerate(pixels):
        for channel in range(3):
            source = channel if to_rgb else 2 - channel  # BGR output reads the channels reversed
            np.take(table[:, channel], rgb[..., source], out=out[index, channel], mode="clip")
    return out


def pad_images(images: np.ndarray, size_divisor: int = 32) -> np.ndarray:
    """Zero-pad (N, C, H, W) at the bottom and right up to multiples of ``size_divisor``."""
    height, width = images.shape[-2:]
    pad_h = (-height) % size_divisor
    pad_w = (-width) % size_divisor
    if pad_h == 0 and pad_w == 0:
        return images
    return np.pad(images, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))
