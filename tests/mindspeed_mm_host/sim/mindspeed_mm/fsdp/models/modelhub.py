"""SIMULATION of ``mindspeed_mm/fsdp/models/modelhub.py`` (#6, #25).

``AutoConfig.from_pretrained(model_name_or_path)`` is always tried first (stand-in: it succeeds only
for a directory holding ``config.json``); then the registered class's HF-style
``from_pretrained(path, config=..., dtype=float32, ...)`` is called. Only when it fails is the custom
path taken: ``model_id`` is required, ``cls.from_pretrained(ModelArguments)`` (or ``_from_config``
under an empty-weights context with meta init), then ``.float()``, then ``freeze`` patterns.
"""

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from mindspeed_mm.fsdp.params.argument import ModelArguments, TrainingArguments
from mindspeed_mm.fsdp.utils.log import print_rank
from mindspeed_mm.fsdp.utils.register import model_register
from mindspeed_mm.fsdp.utils.utils import module_name_match

logger = logging.getLogger(__name__)


class AutoConfigStandIn:
    @staticmethod
    def from_pretrained(path: Optional[str], **_: Any) -> dict:
        if path is None:
            raise TypeError("expected str, bytes or os.PathLike object, not NoneType")
        config = Path(path) / "config.json"
        if not config.is_file():
            raise OSError(f"{path} does not appear to have a file named config.json")
        return json.loads(config.read_text())


class ModelHub:
    @staticmethod
    def _build_custom_model(model_args: ModelArguments, training_args: TrainingArguments) -> torch.nn.Module:
        if not model_args.model_id:
            raise ValueError("`model_id` must be provided in model_args when using custom models.")
        model_cls = model_register.get(model_args.model_id)
        if training_args.init_model_with_meta_device:
            with torch.device("meta"):
                return model_cls._from_config(model_args).float()
        return model_cls.from_pretrained(model_args).float()

    @staticmethod
    def build(model_args: ModelArguments, training_args: TrainingArguments) -> torch.nn.Module:
        try:
            hf_config = AutoConfigStandIn.from_pretrained(model_args.model_name_or_path)
        except Exception as error:
            logger.warning(
                "AutoConfig.from_pretrained failed (%s); falling back to custom model builder.", error
            )
            hf_config = None
        if hf_config is not None:
            model_cls = model_register.get(model_args.model_id)
            model = model_cls.from_pretrained(
                model_args.model_name_or_path,
                config=hf_config,
                dtype=torch.float32,
                low_cpu_mem_usage=True,
                device_map="cpu",
                trust_remote_code=model_args.trust_remote_code,
            )
        else:
            model = ModelHub._build_custom_model(model_args, training_args)
        frozen = [
            (name, module)
            for name, module in model.named_modules()
            if any(module_name_match(pattern, name) for pattern in model_args.freeze)
        ]
        for name, module in frozen:
            print_rank(logger.info, f"freezing module {name}...")
            for param in module.parameters():
                param.requires_grad_(False)
        return model
