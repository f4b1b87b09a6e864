import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streampetr_plugin.registry import Registry, RegistryError


class WidthParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(4, ge=1)


def make_thing(params: WidthParams, *, scale: int = 1) -> dict:
    return {"width": params.width, "scale": scale}


def make_unchecked(**options) -> dict:
    return options


def test_register_get_names_and_contains():
    registry = Registry("backbones")
    registry.register("vovnet", make_thing, params=WidthParams, provider="builtin")
    assert "vovnet" in registry and "resnet" not in registry
    assert registry.names() == ["vovnet"]
    assert registry.get("vovnet").provider == "builtin"


def test_build_validates_and_defaults_options_and_passes_context():
    registry = Registry("backbones")
    registry.register("vovnet", make_thing, params=WidthParams)
    assert registry.build("vovnet", {}, scale=3) == {"width": 4, "scale": 3}
    with pytest.raises(ValidationError):
        registry.build("vovnet", {"width": 0})
    with pytest.raises(ValidationError):
        registry.build("vovnet", {"widht": 2})


def test_a_validated_params_instance_is_built_from_as_it_is():
    registry = Registry("backbones")
    registry.register("vovnet", make_thing, params=WidthParams)
    params = registry.validate("vovnet", {"width": 7})
    assert isinstance(params, WidthParams)
    assert registry.build("vovnet", params, scale=2) == {"width": 7, "scale": 2}
    registry.register("loose", make_unchecked)
    assert registry.validate("loose", {"a": 1}) is None
    assert registry.build("loose", {"a": 1}, b=2) == {"a": 1, "b": 2}


def test_duplicate_name_names_both_providers():
    registry = Registry("necks")
    registry.register("cpfpn", make_thing, provider="streampetr-builtin")
    with pytest.raises(RegistryError, match="streampetr-builtin.*other-plugin"):
        registry.register("cpfpn", make_thing, provider="other-plugin")


def test_unknown_name_lists_available_and_suggests_closest():
    registry = Registry("backbones")
    for name in ("vovnet", "resnet"):
        registry.register(name, make_thing)
    with pytest.raises(RegistryError) as info:
        registry.get("vovnte")
    message = str(info.value)
    assert "resnet, vovnet" in message and "did you mean 'vovnet'" in message
