"""examples/streampetr-tiny-backbone: installed as a real distribution, discovered through its entry
point, selected in a recipe by name, and trained one step by the trainer."""
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from data_fixtures import TINY_FINAL_DIM, synthetic_nuscenes  # noqa: F401  (session fixture)

from streampetr_plugin import build_model, hookimpl, load_recipe
from streampetr_plugin.cli.main import main as streampetr_main
from streampetr_plugin.config.loader import RECIPE_DIR, RecipeError
from streampetr_plugin.host import create_plugin_host

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "streampetr-tiny-backbone"
MODULE = "streampetr_tiny_backbone"


def _install(site: Path, source: Path) -> None:
    """``pip install --target`` without network; where setuptools is missing (it is only a build
    dependency), the same files by hand: the module plus a dist-info with the entry points."""
    if importlib.util.find_spec("setuptools") is not None:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
             "--quiet", "--disable-pip-version-check", "--target", str(site), str(source)],
            check=True, capture_output=True,
        )
        return
    tomllib = pytest.importorskip("tomllib", reason="neither setuptools nor tomllib to install the example")
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    info = site / f"{MODULE}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    entry_points = project["entry-points"]["streampetr"]
    (info / "entry_points.txt").write_text(
        "[streampetr]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    )
    shutil.copy(source / f"{MODULE}.py", site)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example installed into a fresh directory (copied first: a build writes next to its sources)."""
    root = tmp_path_factory.mktemp("example_plugin")
    source = shutil.copytree(EXAMPLE, root / "source")
    _install(root / "site", source)
    return root / "site"


@pytest.fixture
def installed(site, monkeypatch):
    for name in ("STREAMPETR_STRICT_PLUGINS", "STREAMPETR_LOAD_PLUGINS", "STREAMPETR_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop(MODULE, None)
    yield create_plugin_host()
    sys.modules.pop(MODULE, None)


def tiny_recipe(path: Path, width: int = 16) -> Path:
    """The reference R50 recipe with the example backbone and a tiny neck and heads."""
    path.write_text(textwrap.dedent(f"""
        _base_: {RECIPE_DIR / 'r50_8p.yaml'}
        name: tiny_backbone_demo
        model:
          backbone:
            _delete_: true
            type: tiny
            width: {width}
          neck: {{out_channels: 32}}
          roi_head: {{embed_dims: 32}}
          head: {{embed_dims: 32, num_query: 16, memory_len: 16, topk_proposals: 4, num_propagated: 4,
                  scalar: 2, depth_num: 30, num_layers: 1, num_heads: 4, feedforward_channels: 64,
                  with_cp: false}}
    """))
    return path


def test_the_example_installs_as_a_distribution_with_an_entry_point(site):
    dist_info = next(site.glob("streampetr_tiny_backbone-*.dist-info"))
    entry_points = (dist_info / "entry_points.txt").read_text()
    assert "[streampetr]\ntiny_backbone = streampetr_tiny_backbone" in entry_points
    assert (site / f"{MODULE}.py").is_file()


def test_backbone_is_discovered_through_the_entry_point(installed, capsys):
    entry = installed.registries.backbones.get("tiny")
    assert entry.provider == "tiny_backbone" and entry.factory.__module__ == MODULE
    assert installed.distributions["tiny_backbone"] == ("streampetr-tiny-backbone", "0.1.0")
    assert streampetr_main(["plugins", "--json"], installed) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    assert plugins["tiny_backbone"]["components"] == {"backbones": ["tiny"]}
    assert plugins["tiny_backbone"]["hooks"] == ["streampetr_register_backbones"]


def test_a_recipe_selects_the_backbone_and_the_neck_is_sized_from_it(installed, tmp_path):
    model = build_model(load_recipe(tiny_recipe(tmp_path / "tiny.yaml", width=24), host=installed), installed)
    assert type(model.img_backbone).__module__ == MODULE
    assert model.img_backbone.output_shape()["stage4"].channels == 24
    features = model.img_backbone(torch.zeros(1, 3, 64, 160))
    assert features["stage4"].shape == (1, 24, 4, 10) and features["stage5"].shape == (1, 24, 2, 5)
    neck_inputs = {m.in_channels for m in model.img_neck.modules() if isinstance(m, torch.nn.Conv2d)}
    assert 24 in neck_inputs  # the neck was built for the declared width, not a hard-coded one


def test_the_backbone_options_are_validated_by_its_params_model(installed, tmp_path):
    with pytest.raises(RecipeError) as error:
        load_recipe(tiny_recipe(tmp_path / "narrow.yaml", width=4), host=installed)
    assert any("model.backbone.width" in line and "greater than or equal to 8" in line
               for line in error.value.errors)


def _backbone_weights(model):
    return {key: value.detach().clone() for key, value in model.img_backbone.state_dict().items()}


class BackboneRecorder:
    """Lifecycle hooks that record the backbone's weights around training."""

    def __init__(self) -> None:
        self.backbone_before = None
        self.backbone_after = None

    @hookimpl
    def streampetr_pre_train(self, context):
        self.backbone_before = _backbone_weights(context.model)

    @hookimpl
    def streampetr_post_train(self, context):
        self.backbone_after = _backbone_weights(context.model)


def test_the_trainer_trains_one_step_with_the_plugin_backbone(
    installed, tmp_path, synthetic_nuscenes  # noqa: F811
):
    from streampetr_plugin.training.trainer import train

    recorder = BackboneRecorder()
    installed.register_plugin(recorder, name="backbone-recorder")
    height, width = TINY_FINAL_DIM
    data = [f"root={synthetic_nuscenes.root}", "version=v1.0-mini", f"final_dim=[{height},{width}]",
            "resize_lim=[0.9,1.1]"]
    recipe = load_recipe(tiny_recipe(tmp_path / "tiny.yaml"), [
        *(f"data.train.{option}" for option in data),
        *(f"data.val.{option}" for option in data),
        "data.batch_size_per_device=1", "data.num_workers=0", "accelerator.device=cpu",
        "runtime.max_iters=1", "runtime.evaluate_at_end=false", "runtime.progress_bar='off'",
        f"runtime.work_dir={tmp_path / 'run'}",
    ], installed)
    result = train(recipe, host=installed)
    assert result.iteration == 1 and result.last_checkpoint is not None and result.last_checkpoint.is_file()
    assert set(recorder.backbone_before) == set(recorder.backbone_after)
    before, after = recorder.backbone_before, recorder.backbone_after
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed  # the optimiser stepped the plugin's weights
    assert all(torch.isfinite(value).all() for value in after.values())
