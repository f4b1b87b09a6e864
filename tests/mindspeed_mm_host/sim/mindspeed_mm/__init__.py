"""SIMULATION of MindSpeed-MM's plugin-style FSDP2 trainer, for CPU tests only. NOT MindSpeed-MM.

Written from MindSpeed-MM's plugin-trainer contract (the behaviours reproduced here are numbered
#1..#28 in the docstrings) so that ``streampetr_plugin.integrations.mindspeed_mm`` can be
exercised without Ascend hardware. Module paths mirror the real package where the plugin imports
them (``mindspeed_mm.fsdp.utils.register``, ``.fsdp.train.trainer``, ``.fsdp.train.train_engine``,
``.fsdp.params.argument``, ``.fsdp.distributed.parallel_state``, ``.config.config_manager``); the
rest is condensed. Behaviour that a single CPU process cannot have (NPU streams, real FSDP2
sharding, HF models) is replaced by stand-ins that keep the observable contract.
"""

SIMULATION = True
