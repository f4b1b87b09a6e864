"""SIMULATION of ``mindspeed_mm/fsdp/utils/register.py``: plugin import and the two registries.

#4: ``import_plugin`` turns ``/`` into ``.``, strips dots, imports the entry; a missing top-level
entry is only printed; a package is walked with ``pkgutil.walk_packages`` and every non-package
module below it is imported, a ``ModuleNotFoundError`` there is re-raised; a plain module is not
walked. #5: duplicate ids raise ``KeyError``, unknown ids raise ``KeyError``; exactly two registries.
"""

import importlib
import pkgutil
from typing import Any, Dict, List, Optional

from mindspeed_mm.fsdp.utils.log import print_rank0


def import_package(package_name: str, print_info: bool = True):
    name = package_name.replace("/", ".").strip(".")
    try:
        package = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if not print_info:
            raise
        print_rank0(f"Import failed: {name}. Error: {error}")
        return None, None
    if print_info:
        print_rank0(f"Successfully imported: {name}")
    return package, name


def import_plugin(plugin_list: Optional[List[str]] = None) -> None:
    for entry in plugin_list or []:
        package, name = import_package(entry, print_info=True)
        if not hasattr(package, "__path__"):
            continue
        for _, module_name, is_package in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            if not is_package:
                import_package(module_name, print_info=False)


class Register:
    def __init__(self) -> None:
        self._registry: Dict[str, Any] = {}

    def register(self, obj_id: str):
        def decorator(obj):
            if obj_id in self._registry:
                raise KeyError(f"ID '{obj_id}' is already registered to {self._registry[obj_id].__name__}.")
            self._registry[obj_id] = obj
            return obj

        return decorator

    def get(self, obj_id: str):
        if obj_id not in self._registry:
            raise KeyError(f"ID '{obj_id}' is not registered.")
        return self._registry[obj_id]


model_register = Register()
data_register = Register()
