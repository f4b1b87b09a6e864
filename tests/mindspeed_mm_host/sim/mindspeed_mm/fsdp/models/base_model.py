"""SIMULATION of ``mindspeed_mm/fsdp/models/base_model.py``: the custom-model interface."""

from abc import ABC, abstractmethod


class BaseModel(ABC):
    @classmethod
    @abstractmethod
    def from_pretrained(cls, config):
        """Build the model from the whole ``ModelArguments`` and load its weights."""

    @classmethod
    @abstractmethod
    def _from_config(cls, config):
        """Build the model without weights (meta-device initialisation)."""
