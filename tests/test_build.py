"""build_model(load_recipe(...)): the shipped recipes give the reference detector, key for key."""
import json
from pathlib import Path

import pytest
import torch

from streampetr_plugin import build_model, hookimpl, load_recipe
from streampetr_plugin.config.loader import RecipeError, recipe_to_dict
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.models.layers.grid_mask import GridMaskParams
from streampetr_plugin.training.optimizers import AdamWParams

SPEC = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize(
    "recipe, key_list, parameters, trainable",
    [
        ("vov_8p", "reference_state_dict_vov_800.json", 82_947_153, 82_946_289),
        ("r50_8p", "reference_state_dict_r50_704.json", 37_259_345, 37_205_361),
    ],
)
def test_shipped_recipe_builds_the_reference_detector(recipe, key_list, parameters, trainable):
    model = build_model(load_recipe(recipe))
    reference = json.loads((SPEC / key_list).read_text())["state_dict"]
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert set(ours) == set(reference)
    assert all(ours[key] == tuple(entry["shape"]) for key, entry in reference.items())
    unique = {id(p): p for p in model.parameters()}.values()  # the shared branches count once
    assert sum(p.numel() for p in unique) == parameters
    assert sum(p.numel() for p in unique if p.requires_grad) == trainable
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_post_model_build_hook_sees_the_model():
    seen = []

    class Spy:
        @hookimpl
        def streampetr_post_model_build(self, model, recipe):
            seen.append((type(model).__name__, recipe.name))

    host = create_plugin_host()
    host.register_plugin(Spy(), name="spy")
    model = build_model(load_recipe("demo_cpu", host=host), host)
    assert seen == [(type(model).__name__, "demo_cpu")]
    assert isinstance(model, torch.nn.Module)


def test_the_heads_take_their_stride_from_the_neck_level():
    assert build_model(load_recipe("demo_cpu")).stride == 16
    # stage3 + stage4 put a stride-8 level first: both heads place their tokens and 2D targets on it.
    model = build_model(load_recipe("demo_cpu", ["model.backbone.out_features=[stage3,stage4]"]))
    assert model.stride == model.img_roi_head.stride == 8
    with pytest.raises(RecipeError, match="model.stride: unknown key"):
        load_recipe("demo_cpu", ["model.stride=8"])


def test_component_options_are_validated_once_and_kept_typed():
    recipe = load_recipe("demo_cpu", ["optimization.optimizer.lr=0.001"])
    params = recipe.optimization.optimizer.params
    assert isinstance(params, AdamWParams) and params.lr == 0.001
    assert isinstance(recipe.model.params.grid_mask, GridMaskParams)
    # printed and saved flat beside the type, defaults filled in
    dumped = recipe_to_dict(recipe)["optimization"]["optimizer"]
    assert dumped == {"type": "adamw", **AdamWParams(lr=0.001).model_dump(mode="json")}
