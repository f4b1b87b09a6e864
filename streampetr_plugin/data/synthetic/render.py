"""Camera images: box faces projected and painted far to near over a checkerboard ground, with the
visible and silhouette pixels of every object (for the visibility bins)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import shapely.geometry
from PIL import Image, ImageDraw

from ..geometry import invert_rigid, transform_points

NEAR_PLANE_M = 0.1

# Box faces as corner indices of geometry.box_corners, with a shade factor (front = +x = brightest).
_FACES: Tuple[Tuple[Tuple[int, int, int, int], float], ...] = (
    ((0, 3, 7, 4), 1.00),  # front
    ((1, 2, 6, 5), 0.45),  # back
    ((0, 1, 5, 4), 0.72),  # left
    ((3, 2, 6, 7), 0.72),  # right
    ((4, 5, 6, 7), 0.88),  # top
    ((0, 1, 2, 3), 0.30),  # bottom
)


def _clip_near(points: np.ndarray) -> np.ndarray:
    """Clip a convex polygon (K, 3) in camera coordinates to z >= NEAR_PLANE_M (Sutherland-Hodgman)."""
    clipped = []
    for i in range(len(points)):
        current, following = points[i], points[(i + 1) % len(points)]
        current_in, following_in = current[2] >= NEAR_PLANE_M, following[2] >= NEAR_PLANE_M
        if current_in:
            clipped.append(current)
        if current_in != following_in:
            ratio = (NEAR_PLANE_M - current[2]) / (following[2] - current[2])
            clipped.append(current + ratio * (following - current))
    return np.array(clipped).reshape(-1, 3)


def _render_background(intrinsic: np.ndarray, cam2global: np.ndarray, width: int, height: int) -> np.ndarray:
    """Sky gradient and a checkerboard ground plane (z = 0, 5 m squares, fogged with distance).

    Returns an (H, W, 3) uint8 image.
    """
    pixel_to_ray = (cam2global[:3, :3] @ np.linalg.inv(intrinsic)).astype(np.float32)
    u = np.arange(width, dtype=np.float32)[None, :] + 0.5
    v = np.arange(height, dtype=np.float32)[:, None] + 0.5
    # Global ray directions of the pixel centres, one (H, W) array per axis.
    ray_x, ray_y, ray_z = (
        pixel_to_ray[i, 0] * u + pixel_to_ray[i, 1] * v + pixel_to_ray[i, 2] for i in range(3)
    )
    origin = cam2global[:3, 3]
    sky_mix = np.clip(ray_z / np.sqrt(ray_x**2 + ray_y**2 + ray_z**2), 0.0, 0.5) * 2.0  # (H, W)
    ground = ray_z < -1e-6
    distance = -np.float32(origin[2]) / np.where(ground, ray_z, -1.0)
    hit_x, hit_y = origin[0] + distance * ray_x, origin[1] + distance * ray_y
    checker = (np.floor(hit_x / 5.0) + np.floor(hit_y / 5.0)) % 2
    fog = np.clip(distance / 150.0, 0.0, 1.0)
    channels = []
    # Per colour channel (broadcasting over a trailing axis of 3 is several times slower).
    for horizon, zenith, light, dark in ((185.0, 90.0, 128.0, 92.0), (205.0, 140.0, 126.0, 95.0),
                                        (225.0, 205.0, 120.0, 98.0)):
        sky = horizon + (zenith - horizon) * sky_mix
        floor = np.where(checker > 0, light, dark) * (1 - fog) + horizon * fog
        channels.append(np.where(ground, floor, sky))
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def _visible_faces(corners_cam: np.ndarray, intrinsic: np.ndarray) -> List[Tuple[np.ndarray, float]]:
    """Projected front-facing faces of one box, near-plane clipped: [(pixel polygon (K, 2), shade)]."""
    faces = []
    center = corners_cam.sum(axis=0) / 8.0
    for face, shade in _FACES:
        face_points = corners_cam[list(face)]
        face_center = face_points.sum(axis=0) / 4.0
        if np.dot(face_center - center, -face_center) <= 0:  # back face: normal points away from the camera
            continue
        polygon = _clip_near(face_points)
        if len(polygon) < 3:
            continue
        projected = polygon @ intrinsic.T
        faces.append((projected[:, :2] / projected[:, 2:3], shade))
    return faces


def render_camera(
    intrinsic: np.ndarray, cam2global: np.ndarray, width: int, height: int,
    corners_global: np.ndarray, colours: Sequence[Tuple[int, int, int]],
) -> Tuple[Image.Image, np.ndarray, np.ndarray]:
    """Render one camera image; count each object's visible and silhouette pixels.

    ``corners_global`` (M, 8, 3) box corners, ``colours`` M RGB triples. Returns the RGB image,
    visible pixel counts (M,) (after occlusion) and silhouette areas (M,) (projected hull inside the
    image, as if unoccluded).
    """
    image = Image.fromarray(_render_background(intrinsic, cam2global, width, height))
    id_map = Image.new("I", (width, height), 0)
    draw, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(id_map)
    corners_cam = transform_points(invert_rigid(cam2global), corners_global)  # (M, 8, 3)
    silhouette = np.zeros(len(corners_cam))
    canvas = shapely.geometry.box(0, 0, width, height)
    for index in np.argsort(-np.linalg.norm(corners_cam.mean(axis=1), axis=1), kind="stable"):  # far to near
        if (corners_cam[index, :, 2] < NEAR_PLANE_M).all():
            continue
        faces = _visible_faces(corners_cam[index], intrinsic)
        if not faces:
            continue
        hull = shapely.geometry.MultiPoint(np.concatenate([polygon for polygon, _ in faces])).convex_hull
        silhouette[index] = hull.intersection(canvas).area
        for polygon, shade in faces:
            xy = [(float(x), float(y)) for x, y in polygon]
            colour = tuple(int(round(channel * shade)) for channel in colours[index])
            outline = tuple(int(round(channel * shade * 0.6)) for channel in colours[index])
            draw.polygon(xy, fill=colour, outline=outline)
            draw_ids.polygon(xy, fill=int(index) + 1)
    visible = np.bincount(np.asarray(id_map, dtype=np.int32).ravel(), minlength=len(corners_cam) + 1)[1:]
    return image, visible, silhouette
