"""Per-sample nuScenes info files: build them with nuscenes-devkit, store and load them without pickle.

- :mod:`.records`: the typed records (:class:`SampleInfo`, :class:`CameraInfo`, :class:`InfoSet`);
- :mod:`.convert`: :func:`create_infos`, nuScenes tables -> records, as the reference converter computes them;
- :mod:`.storage`: our ``streampetr_infos_<split>.json`` / ``.npz`` files (:func:`save_infos`,
  :func:`load_infos`, :func:`load_info_file`);
- :mod:`.reference_pkl`: the reference ``.pkl`` files through a restricted unpickler;
- :mod:`.errors`: missing or unusable info files.
"""
from streampetr_plugin.safe_loading import UnsafePickleError

from .convert import NAME_MAPPING, create_infos
from .errors import InfoFileError, InfoFileNotFoundError
from .records import CAMERA_NAMES, CONVERTER_CLASSES, CameraInfo, InfoSet, SampleInfo
from .reference_pkl import load_reference_pkl
from .storage import INFO_FORMAT, INFO_FORMAT_VERSION, info_file_name, load_info_file, load_infos, save_infos

__all__ = [
    "CAMERA_NAMES",
    "CONVERTER_CLASSES",
    "NAME_MAPPING",
    "INFO_FORMAT",
    "INFO_FORMAT_VERSION",
    "CameraInfo",
    "SampleInfo",
    "InfoSet",
    "InfoFileError",
    "InfoFileNotFoundError",
    "UnsafePickleError",
    "create_infos",
    "save_infos",
    "load_infos",
    "load_reference_pkl",
    "load_info_file",
    "info_file_name",
]
