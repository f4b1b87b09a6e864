"""The streaming nuScenes dataset: one key frame per item, sequences flagged for the stream sampler.

Infos are sorted by timestamp, so the frames of a scene are contiguous and in order. A sequence
starts at every sample with no earlier LiDAR sweep (the first key frame of a scene); with
``seq_split_num = k`` each sequence is cut into k consecutive groups of ``ceil(n / k)`` frames.
``flag[i]`` is the group of sample i; in training ``prev_exists`` is 0 at the first frame of each
group (reference ``nuscenes_dataset.py``, ``_set_sequence_group_flag`` and ``get_data_info``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from streampetr_plugin.config.schema import NUSCENES_CLASSES
from streampetr_plugin.errors import InputError

from .geometry import invert_rigid, pose_matrix, rigid_matrix
from .infos import CAMERA_NAMES, InfoSet, SampleInfo, load_info_file
from .prepare_synthetic import SyntheticDataOptions, ensure_synthetic_dataset
from .transforms import (
    RESIZE_PATHS,
    Frame,
    GlobalRotScaleTransImage,
    ObjectNameFilter,
    ObjectRangeFilter,
    ResizeCropFlipRotImage,
    normalize_images,
    pad_images,
)

__all__ = [
    "NUSCENES_CLASSES",
    "NuScenesDatasetParams",
    "NuScenesStreamDataset",
    "ImageReadError",
    "sequence_group_flags",
]

class ImageReadError(InputError):
    """A camera image is missing or cannot be decoded; the message names the file and the sample token."""


IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)  # what PIL raises on a bad file


class NuScenesDatasetParams(BaseModel):
    """User settings of the nuScenes data pipeline (defaults: the reference V2-99 800x320 recipe)."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(default="data/nuscenes",
                      description="nuScenes dataset root (holds samples/ and the infos)")
    version: str = Field(default="v1.0-trainval", description="nuScenes version, for messages and evaluation")
    train_info: str = Field(
        default="streampetr_infos_train.json",
        description="training info file, relative to root (.json ours, .pkl a reference info file)",
    )
    val_info: str = Field(
        default="streampetr_infos_val.json",
        description="validation info file, relative to root (.json or .pkl)",
    )
    synthetic: Optional[SyntheticDataOptions] = Field(
        default=None,
        description="Generate a synthetic nuScenes with these options into root (and build its infos) when the "
        "info files are missing; null: the data must exist",
    )
    final_dim: Tuple[int, int] = Field(default=(320, 800),
                                       description="network input (height, width) after crop")
    resize_lim: Tuple[float, float] = Field(default=(0.47, 0.625), description="training resize ratio range")
    bot_pct_lim: Tuple[float, float] = Field(
        default=(0.0, 0.0), description="fraction of the resized image bottom cut off before the crop"
    )
    rot_lim: Tuple[float, float] = Field(default=(0.0, 0.0), description="image rotation range (must be 0)")
    rand_flip: bool = Field(default=True, description="random horizontal flip in training")
    test_resize: Optional[float] = Field(
        default=None, gt=0, description="test resize ratio; None = max(fH / H, fW / W) as the reference"
    )
    rot_range: Tuple[float, float] = Field(default=(-0.3925, 0.3925),
                                           description="global BEV rotation range, rad")
    scale_ratio_range: Tuple[float, float] = Field(default=(0.95, 1.05), description="global scaling range")
    translation_std: Tuple[float, float, float] = Field(
        default=(0.0, 0.0, 0.0), description="std of the global translation, m"
    )
    mean: Tuple[float, float, float] = Field(
        default=(103.530, 116.280, 123.675), description="normalisation mean, in the output channel order"
    )
    std: Tuple[float, float, float] = Field(default=(57.375, 57.120, 58.395), description="normalisation std")
    to_rgb: bool = Field(default=False, description="False: BGR network input (V2-99); True: RGB (R50)")
    size_divisor: int = Field(default=32, ge=1, description="pad images to multiples of this")
    point_cloud_range: Tuple[float, float, float, float, float, float] = Field(
        default=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), description="3D target range (BEV part used to filter)"
    )
    seq_split_num: int = Field(default=2, ge=1, description="groups each scene is cut into for streaming")
    use_valid_flag: bool = Field(default=True, description="train only on boxes with LiDAR or radar points")
    filter_invisible: bool = Field(default=True,
                                   description="drop fully occluded 2D boxes after augmentation")
    resize_path: Literal["reference", "cropped", "draft"] = Field(
        default="reference",
        description="how camera images become the input size: " + "; ".join(
            f"{name}: {what}" for name, what in RESIZE_PATHS.items()
        ),
    )


def sequence_group_flags(num_sweeps: Sequence[int], seq_split_num: int) -> np.ndarray:
    """Group id (n,) int64 of each timestamp-sorted sample: a new sequence at every sample with zero
    sweeps (except index 0), each sequence cut into ``seq_split_num`` chunks of ``ceil(len / k)``."""
    sequence = np.cumsum([i != 0 and count == 0 for i, count in enumerate(num_sweeps)]).astype(np.int64)
    if seq_split_num == 1:
        return sequence
    flags = np.empty_like(sequence)
    next_group = 0
    for sequence_id, length in enumerate(np.bincount(sequence)):
        chunk = math.ceil(length / seq_split_num)
        members = np.flatnonzero(sequence == sequence_id)
        flags[members] = next_group + np.arange(length) // chunk
        next_group += math.ceil(length / chunk)
    return flags


def _resolve_path(root: Path, stored: str) -> Path:
    """Resolve a stored image path: ours are relative to root, reference .pkl ones look like
    './data/nuscenes/samples/...' (re-anchored at root's samples/ or sweeps/)."""
    path = Path(stored)
    candidate = path if path.is_absolute() else root / path
    if candidate.exists():
        return candidate
    for anchor in ("samples/", "sweeps/"):
        if anchor in stored:
            relocated = root / stored[stored.index(anchor):]
            if relocated.exists():
                return relocated
    return candidate


class NuScenesStreamDataset(Dataset):
    """Single-frame nuScenes samples in timestamp order, with sequence groups for streaming.

    ``__getitem__`` returns one frame (N cameras, padded H x W)::

        img (N, 3, H, W) f32, intrinsics / extrinsics / lidar2img (N, 4, 4) f32, timestamp () f64 s,
        ego_pose / ego_pose_inv (4, 4) f32, prev_exists () f32, scene_token str, sample_token str,
        and with labels (training): gt_bboxes_3d (n, 9) f32 (gravity centre), gt_labels_3d (n,) i64,
        gt_bboxes_2d / gt_labels_2d / centers_2d / depths: lists of N arrays-as-tensors.

    2D labels keep the converter's class order (car, truck, trailer, bus, construction_vehicle,
    bicycle, motorcycle, pedestrian, traffic_cone, barrier), as in the reference.
    """

    accepts_draw_keys = True  # see build_dataloader: augmentation keyed by stream position

    def __init__(
        self,
        *,
        training: bool,
        root: str | Path = "data/nuscenes",
        version: str = "v1.0-trainval",
        train_info: str = "streampetr_infos_train.json",
        val_info: str = "streampetr_infos_val.json",
        classes: Sequence[str] = NUSCENES_CLASSES,
        final_dim: Tuple[int, int] = (320, 800),
        resize_lim: Tuple[float, float] = (0.47, 0.625),
        bot_pct_lim: Tuple[float, float] = (0.0, 0.0),
        rot_lim: Tuple[float, float] = (0.0, 0.0),
        rand_flip: bool = True,
        test_resize: Optional[float] = None,
        rot_range: Tuple[float, float] = (-0.3925, 0.3925),
        scale_ratio_range: Tuple[float, float] = (0.95, 1.05),
        translation_std: Tuple[float, float, float] = (0.0, 0.0, 0.0),
        mean: Sequence[float] = (103.530, 116.280, 123.675),
        std: Sequence[float] = (57.375, 57.120, 58.395),
        to_rgb: bool = False,
        size_divisor: int = 32,
        point_cloud_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
        seq_split_num: int = 2,
        use_valid_flag: bool = True,
        filter_invisible: bool = True,
        resize_path: str = "reference",
        seed: int = 0,
        synthetic: Optional[Mapping[str, object]] = None,
        infos: Optional[InfoSet] = None,
    ) -> None:
        """Load ``root / train_info`` (training) or ``root / val_info`` (evaluation), unless ``infos``
        is given; the other arguments are :class:`NuScenesDatasetParams` fields."""
        if infos is None and synthetic is not None:
            ensure_synthetic_dataset(Path(root), SyntheticDataOptions.model_validate(synthetic),
                                     info_files=(train_info, val_info))
        if infos is None:
            info_path = Path(root) / (train_info if training else val_info)
            infos = load_info_file(info_path, root=root, version=version)
        self.root = Path(root)
        self.version = infos.version or version
        self.samples: List[SampleInfo] = sorted(infos.samples, key=lambda sample: sample.timestamp)
        self.training = training
        self.classes = tuple(classes)
        self.mean, self.std, self.to_rgb = tuple(mean), tuple(std), to_rgb
        self.size_divisor = size_divisor
        self.use_valid_flag = use_valid_flag
        self.flag = sequence_group_flags([sample.num_sweeps for sample in self.samples], seq_split_num)
        self.range_filter = ObjectRangeFilter(point_cloud_range=point_cloud_range)
        self.name_filter = ObjectNameFilter(num_classes=len(self.classes))
        self.image_augmentation = ResizeCropFlipRotImage(
            final_dim=final_dim, resize_lim=resize_lim, bot_pct_lim=bot_pct_lim, rot_lim=rot_lim,
            rand_flip=rand_flip, training=training, test_resize=test_resize,
            filter_invisible=filter_invisible, resize_path=resize_path,
        )
        self.resize_path = resize_path
        self.global_augmentation = GlobalRotScaleTransImage(
            rot_range=rot_range, scale_ratio_range=scale_ratio_range, translation_std=translation_std,
            reverse_angle=True,
        )
        self._entropy: Tuple[int, ...] = (seed,)
        self._rng = np.random.default_rng(seed)

    def reseed(self, *entropy: int) -> None:
        """Re-seed the augmentation RNG (the loader calls this per rank and per worker)."""
        self._entropy = tuple(entropy)
        self._rng = np.random.default_rng(list(entropy))

    def reseed_running(self, *entropy: int) -> None:
        """Re-seed only the running RNG (unkeyed draws), e.g. per loader worker."""
        self._rng = np.random.default_rng(list(entropy))

    def __len__(self) -> int:
        return len(self.samples)

    def prev_exists(self, index: int) -> bool:
        """False at the first frame of a group (training) or of a scene (evaluation)."""
        if index == 0:
            return False
        if self.training:
            return bool(self.flag[index - 1] == self.flag[index])
        return self.samples[index - 1].scene_token == self.samples[index].scene_token

    def _image_path(self, index: int, name: str) -> Path:
        sample = self.samples[index]
        path = _resolve_path(self.root, sample.cams[name].data_path)
        if not path.exists():
            raise ImageReadError(f"image file {path} of sample {sample.token} ({name}) does not exist")
        return path

    def image_size(self, index: int) -> Tuple[int, int]:
        """(width, height) of sample ``index``'s first camera image, from its header (no decoding)."""
        path = self._image_path(index, CAMERA_NAMES[0])
        try:
            with Image.open(path) as image:
                return image.size
        except IMAGE_ERRORS as error:
            raise self._read_error(index, CAMERA_NAMES[0], path, error) from error

    def _read_error(self, index: int, name: str, path: Path, error: Exception) -> ImageReadError:
        token = self.samples[index].token
        return ImageReadError(f"cannot read image file {path} of sample {token} ({name}): {error}")

    def load_images(self, index: int, draft_size: Optional[Tuple[int, int]] = None) -> List[Image.Image]:
        """The N camera images of sample ``index`` (PIL RGB), fully decoded or, with ``draft_size``
        (width, height), at the smallest JPEG DCT scale (1/2, 1/4, 1/8) not below that size."""
        images = []
        for name in CAMERA_NAMES:
            path = self._image_path(index, name)
            try:
                image = Image.open(path)
                try:
                    if draft_size is not None:
                        image.draft("RGB", draft_size)
                    image.load()  # decodes, then closes the file; the pixels stay (no copy)
                except BaseException:
                    image.close()
                    raise
                images.append(image if image.mode == "RGB" else image.convert("RGB"))
            except IMAGE_ERRORS as error:
                raise self._read_error(index, name, path, error) from error
        return images

    def _targets(self, sample: SampleInfo) -> Tuple[np.ndarray, np.ndarray]:
        """(boxes (n, 9) gravity centre with velocity, NaN -> 0; labels (n,) -1 for other classes)."""
        keep = sample.valid_flag if self.use_valid_flag else sample.num_lidar_pts > 0
        velocity = np.nan_to_num(sample.gt_velocity[keep], nan=0.0)
        boxes = np.concatenate([sample.gt_boxes[keep], velocity], axis=1).reshape(-1, 9)
        labels = np.array([self.classes.index(n) if n in self.classes else -1 for n in sample.gt_names[keep]],
                          dtype=np.int64)
        return boxes, labels

    def raw_frame(self, index: int, draft_size: Optional[Tuple[int, int]] = None) -> Frame:
        """Sample ``index`` before any filter or augmentation (labels attached in training); images as
        :meth:`load_images` decodes them."""
        sample = self.samples[index]
        lidar2ego = pose_matrix(sample.lidar2ego_rotation, sample.lidar2ego_translation)
        ego2global = pose_matrix(sample.ego2global_rotation, sample.ego2global_translation)
        ego_pose = ego2global @ lidar2ego  # LiDAR -> global
        cams = [sample.cams[name] for name in CAMERA_NAMES]
        extrinsics = np.stack(
            [invert_rigid(rigid_matrix(cam.sensor2lidar_rotation, cam.sensor2lidar_translation))
             for cam in cams]
        )
        intrinsics = np.tile(np.eye(4), (len(cams), 1, 1))
        intrinsics[:, :3, :3] = np.stack([cam.intrinsic for cam in cams])
        frame = Frame(
            images=self.load_images(index, draft_size), intrinsics=intrinsics, extrinsics=extrinsics,
            lidar2img=intrinsics @ extrinsics, ego_pose=ego_pose, ego_pose_inv=invert_rigid(ego_pose),
        )
        if self.training:
            frame.boxes_3d, frame.labels_3d = self._targets(sample)
            frame.bboxes_2d = [boxes.astype(np.float32) for boxes in sample.bboxes2d]
            frame.labels_2d = [labels.astype(np.int64) for labels in sample.labels2d]
            frame.centers_2d = [centers.astype(np.float32) for centers in sample.centers2d]
            frame.depths = [depths.astype(np.float32) for depths in sample.depths]
        return frame

    def __getitem__(self, index: Union[int, Tuple[int, Tuple[int, ...]]]) -> Dict[str, object]:
        """Frame ``index``; ``(index, draw_key)`` seeds its augmentation from the key (see the
        training sampler's ``keyed`` mode) instead of the dataset's running RNG."""
        rng = self._rng
        if isinstance(index, tuple):
            index, draw_key = index
            rng = np.random.default_rng([*self._entropy, *draw_key])
        sample = self.samples[index]
        # Drawn first (the filters draw nothing), so that the decoder knows the size the resize needs.
        augmentation = self.image_augmentation.sample(self.image_size(index), rng)
        draft_size = augmentation.resize_dims if self.resize_path == "draft" else None
        frame = self.raw_frame(index, draft_size)
        if self.training:
            frame = self.range_filter(frame, rng)
            frame = self.name_filter(frame, rng)
        frame = self.image_augmentation.apply(frame, augmentation)
        if self.training:
            frame = self.global_augmentation(frame, rng)
        img = normalize_images(frame.images, mean=self.mean, std=self.std, to_rgb=self.to_rgb)
        img = pad_images(img, self.size_divisor)
        item: Dict[str, object] = {
            "img": torch.from_numpy(img),
            "intrinsics": torch.from_numpy(frame.intrinsics.astype(np.float32)),
            "extrinsics": torch.from_numpy(frame.extrinsics.astype(np.float32)),
            "lidar2img": torch.from_numpy(frame.lidar2img.astype(np.float32)),
            "timestamp": torch.tensor(sample.timestamp / 1e6, dtype=torch.float64),
            "ego_pose": torch.from_numpy(frame.ego_pose.astype(np.float32)),
            "ego_pose_inv": torch.from_numpy(frame.ego_pose_inv.astype(np.float32)),
            "prev_exists": torch.tensor(float(self.prev_exists(index)), dtype=torch.float32),
            "scene_token": sample.scene_token,
            "sample_token": sample.token,
        }
        if self.training:
            item.update(
                gt_bboxes_3d=torch.from_numpy(frame.boxes_3d.astype(np.float32)),
                gt_labels_3d=torch.from_numpy(frame.labels_3d),
                gt_bboxes_2d=[torch.from_numpy(np.asarray(b, dtype=np.float32)) for b in frame.bboxes_2d],
                gt_labels_2d=[torch.from_numpy(np.asarray(lab, dtype=np.int64)) for lab in frame.labels_2d],
                centers_2d=[torch.from_numpy(np.asarray(c, dtype=np.float32)) for c in frame.centers_2d],
                depths=[torch.from_numpy(np.asarray(d, dtype=np.float32)) for d in frame.depths],
            )
        return item
