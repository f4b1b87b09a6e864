"""Carry a StreamPETR batch through MindSpeed-MM's ``move_to_device`` bit for bit.

The host keeps only tensors (and lists of tensors, and scalars) of a batch and casts every floating
tensor to ``fsdp_plan.param_dtype``; FSDP2 casts floating forward inputs again at every wrapped
module. Camera geometry and float64 timestamps must survive both, so :func:`encode_batch` emits no
floating tensor at all:

* a floating tensor travels as its bit pattern (``view`` as the same-width integer) under
  ``<name>__<dtype>`` (``__f32``, ``__f64``, ``__f16``, ``__bf16``); integer and bool tensors keep
  their name;
* a per-frame list of tensors (``gt_bboxes_3d``: list[B] of (n_b, 9)) is zero-padded to
  (B, max n, ...) under ``<name>__ragged1`` plus its lengths ``<name>__lengths`` (B,) int64; a
  per-frame, per-camera list (``gt_bboxes_2d``) to (B, N, max m, ...) under ``<name>__ragged2``
  plus (B, N) lengths;
* strings are not carried (the dataset adds integer ``scene_idx``/``frame_idx``/``sample_idx``);
* ``precision_probe``, the one floating tensor left on purpose, reveals a host that casts inputs.

:func:`decode_batch` inverts this exactly and ignores keys it does not know (``use_cache`` etc.).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

PROBE_KEY = "precision_probe"
PROBE_VALUE = 1.0 / 3.0
LENGTHS = "lengths"

_BITS: Dict[torch.dtype, Tuple[str, torch.dtype]] = {
    torch.float32: ("f32", torch.int32),
    torch.float64: ("f64", torch.int64),
    torch.float16: ("f16", torch.int16),
    torch.bfloat16: ("bf16", torch.int16),
}
_FLOATS = {tag: dtype for dtype, (tag, _) in _BITS.items()}
_RAGGED = frozenset({"ragged1", "ragged2"})


class HostCastError(ValueError):
    """The host cast floating batch inputs: its ``fsdp_plan.param_dtype`` is set."""


def _encode_tensor(name: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
    if not torch.is_floating_point(tensor):
        return {name: tensor}
    tag, bits = _BITS[tensor.dtype]
    return {f"{name}__{tag}": tensor.contiguous().view(bits)}


def _pad(tensors: Sequence[torch.Tensor], template: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """list of (n_i, ...) -> zero-padded (len, max n, ...) and lengths (len,) int64."""
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64)
    width = int(lengths.max()) if len(tensors) else 0
    padded = template.new_zeros((len(tensors), width, *template.shape[1:]))
    for row, tensor in enumerate(tensors):
        padded[row, : tensor.shape[0]] = tensor
    return padded, lengths


def _encode_ragged(name: str, value: List[Any]) -> Dict[str, torch.Tensor]:
    if all(isinstance(item, torch.Tensor) for item in value):
        padded, lengths = _pad(value, value[0])
        return {**_encode_tensor(f"{name}__ragged1", padded), f"{name}__{LENGTHS}": lengths}
    # list[B] of list[N] of (m, ...): pad every frame to the same m, then stack the frames.
    flat = [tensor for frame in value for tensor in frame]
    padded, lengths = _pad(flat, flat[0])
    frames, cameras = len(value), len(value[0])
    return {
        **_encode_tensor(f"{name}__ragged2", padded.view(frames, cameras, *padded.shape[1:])),
        f"{name}__{LENGTHS}": lengths.view(frames, cameras),
    }


def _is_ragged(value: Any) -> bool:
    if not isinstance(value, list) or not value:
        return False
    first = value[0]
    if isinstance(first, torch.Tensor):
        return all(isinstance(item, torch.Tensor) for item in value)
    return (
        isinstance(first, list)
        and bool(first)
        and all(
            isinstance(frame, list)
            and len(frame) == len(first)
            and all(isinstance(t, torch.Tensor) for t in frame)
            for frame in value
        )
    )


def encode_batch(batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """A batch of the contract (plus integer index tensors) -> a flat dict of non-floating tensors.

    Strings and lists of strings are left out; anything else that is neither a tensor nor a ragged
    list of tensors is an error, because the host would drop it silently.
    """
    flat: Dict[str, torch.Tensor] = {PROBE_KEY: torch.tensor(PROBE_VALUE, dtype=torch.float32)}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            flat.update(_encode_tensor(name, value))
        elif _is_ragged(value):
            flat.update(_encode_ragged(name, value))
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            continue
        else:
            raise TypeError(
                f"batch[{name!r}] ({type(value).__name__}) cannot be carried through MindSpeed-MM"
            )
    return flat


def _decode_tensor(tag: str, tensor: torch.Tensor) -> torch.Tensor:
    float_dtype = _FLOATS[tag]
    if tensor.dtype != _BITS[float_dtype][1]:
        raise HostCastError(f"an encoded {tag} tensor arrived as {tensor.dtype}")
    return tensor.view(float_dtype)


def _unpad(padded: torch.Tensor, lengths: torch.Tensor) -> List[Any]:
    if lengths.dim() == 1:
        return [padded[row, :count] for row, count in enumerate(lengths.tolist())]
    return [
        [padded[row, camera, :count] for camera, count in enumerate(counts)]
        for row, counts in enumerate(lengths.tolist())
    ]


def check_precision_probe(flat: Mapping[str, Any]) -> None:
    """Raise :class:`HostCastError` when the host cast the probe (``param_dtype`` is set)."""
    probe = flat.get(PROBE_KEY)
    if probe is None:
        return
    if probe.dtype != torch.float32:
        raise HostCastError(
            f"MindSpeed-MM cast the batch's floating inputs to {probe.dtype}: set "
            "parallel.fsdp_plan.param_dtype: null (StreamPETR autocasts its backbone internally and keeps "
            "its heads, geometry and timestamps in fp32/fp64; see model.streampetr.autocast)"
        )


def decode_batch(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """Invert :func:`encode_batch`; entries that are not tensors (``use_cache`` etc.) are ignored."""
    check_precision_probe(flat)
    batch: Dict[str, Any] = {}
    for key, value in flat.items():
        if key == PROBE_KEY or not isinstance(value, torch.Tensor):
            continue
        name, _, tag = key.rpartition("__")
        if tag == LENGTHS and name:
            continue
        if tag in _FLOATS and name:
            key, value = name, _decode_tensor(tag, value)
            name, _, tag = key.rpartition("__")
        if tag in _RAGGED and name:
            batch[name] = _unpad(value, flat[f"{name}__{LENGTHS}"])
        else:
            batch[key] = value
    return batch
