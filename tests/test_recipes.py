import re
import textwrap

import pytest

from streampetr_plugin import load_recipe
from streampetr_plugin.cli.main import main as streampetr_main
from streampetr_plugin.config.loader import RECIPE_DIR, RecipeError, shipped_recipes

DEMO = RECIPE_DIR / "demo_cpu.yaml"


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.errors


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.source == str(RECIPE_DIR / f"{name}.yaml")


def test_vov_recipe_has_the_reference_values():
    recipe = load_recipe("vov_8p")
    head = recipe.model.head.options()
    assert recipe.model.backbone.type == "vovnet" and recipe.model.backbone.options()["spec_name"] == "V-99-eSE"
    assert (head["num_query"], head["memory_len"], head["num_propagated"], head["topk_proposals"]) == (644, 1024, 256, 256)
    assert recipe.optimization.optimizer.options()["lr"] == 4e-4
    assert recipe.optimization.optimizer.options()["weight_decay"] == 0.01
    assert recipe.optimization.lr_multipliers == {"img_backbone": 0.1}
    assert recipe.optimization.grad_clip.max_norm == 35
    assert recipe.optimization.amp.dtype == "fp16" and recipe.optimization.amp.loss_scale == "dynamic"
    schedule = recipe.optimization.lr_scheduler.options()
    assert (schedule["warmup_iters"], schedule["min_lr_ratio"]) == (500, 1e-3)
    assert abs(schedule["warmup_ratio"] - 1 / 3) < 1e-9
    assert recipe.runtime.epochs == 24 and recipe.data.num_train_samples == 28130
    assert recipe.data.batch_size_per_device == 2


def test_base_inheritance_merges_deeply_and_child_wins(tmp_path):
    child = write(tmp_path / "child.yaml", f"""
        _base_: {DEMO}
        name: child
        runtime:
          seed: 7
        model:
          head:
            num_query: 12
    """)
    base = load_recipe(DEMO)
    recipe = load_recipe(child)
    assert recipe.runtime.seed == 7
    assert recipe.model.head.options()["num_query"] == 12
    # untouched siblings come from the base
    assert recipe.model.head.options()["memory_len"] == base.model.head.options()["memory_len"]
    assert recipe.runtime.log_interval == base.runtime.log_interval


def test_delete_replaces_a_section_instead_of_merging(tmp_path):
    child = write(tmp_path / "child.yaml", f"""
        _base_: {DEMO}
        accelerator:
          _delete_: true
          device: cpu
    """)
    base_yaml = write(tmp_path / "with_adapter.yaml", f"""
        _base_: {DEMO}
        accelerator:
          adapters:
            cpu_threads:
              enabled: false
    """)
    assert load_recipe(base_yaml).accelerator.adapters["cpu_threads"].enabled is False
    grandchild = write(tmp_path / "grandchild.yaml", f"""
        _base_: {base_yaml.name}
        accelerator:
          _delete_: true
          device: cpu
    """)
    assert load_recipe(grandchild).accelerator.adapters == {}
    assert load_recipe(child).accelerator.device == "cpu"


def test_inheritance_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    (line,) = errors_of(tmp_path / "a.yaml")
    assert "cycle" in line and "a.yaml -> " in line and "b.yaml" in line


def test_missing_base_file_names_file_and_line(tmp_path):
    child = write(tmp_path / "child.yaml", "name: x\n_base_: nowhere.yaml\n")
    (line,) = errors_of(child)
    assert line.startswith(f"{child}:2: _base_: ") and "nowhere.yaml" in line


def test_overrides_set_parse_and_delete():
    assert load_recipe(DEMO).runtime.log_interval != 50
    recipe = load_recipe(DEMO, ["runtime.seed=5", "optimization.grad_clip.max_norm=10.5", "runtime.load_from=a.pth",
                                "~runtime.log_interval", "data.num_workers=3"])
    assert recipe.runtime.seed == 5 and recipe.runtime.load_from == "a.pth"
    assert recipe.optimization.grad_clip.max_norm == 10.5 and recipe.data.num_workers == 3
    assert recipe.runtime.log_interval == 50  # deleted: back to the schema default
    assert load_recipe(DEMO, ["optimization.grad_clip=null"]).optimization.grad_clip is None


def test_override_reaches_an_existing_key_with_dots(tmp_path):
    # lr_multipliers keys are substrings of parameter names and may contain dots.
    path = write(tmp_path / "dotted.yaml", f"""
        _base_: {DEMO}
        optimization:
          lr_multipliers:
            attentions.1.attn.in_proj: 0.02
        """)
    base = load_recipe(path).optimization.lr_multipliers
    assert base["attentions.1.attn.in_proj"] == 0.02
    recipe = load_recipe(path, ["optimization.lr_multipliers.attentions.1.attn.in_proj=0.3",
                                "optimization.lr_multipliers.new_key=0.5"])
    multipliers = recipe.optimization.lr_multipliers
    assert multipliers["attentions.1.attn.in_proj"] == 0.3 and multipliers["new_key"] == 0.5
    assert set(multipliers) == set(base) | {"new_key"}
    deleted = load_recipe(path, ["~optimization.lr_multipliers.attentions.1.attn.in_proj"])
    assert set(deleted.optimization.lr_multipliers) == set(base) - {"attentions.1.attn.in_proj"}


def test_bad_override_is_reported_as_command_line():
    errors = errors_of(DEMO, ["runtime.seed=-1", "~runtime.nonexistent"])
    assert any(e.startswith("<command line>: runtime.nonexistent: ") for e in errors)
    assert any(e.startswith("<command line>: runtime.seed: ") for e in errors)


LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<key>[\w.]+): (?P<msg>.+)$")


def test_bad_recipe_reports_every_problem_with_file_line_and_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", f"""
        _base_: {DEMO}
        runtime:
          sed: 3
          log_interval: often
        data:
          batch_size_per_device: 0
        model:
          backbone:
            type: vovnte
    """)
    errors = errors_of(bad)
    parsed = {LINE.match(e).group("key"): LINE.match(e).groupdict() for e in errors}
    assert set(parsed) == {"runtime.sed", "runtime.log_interval", "data.batch_size_per_device",
                           "model.backbone.type"}, errors
    assert parsed["runtime.sed"]["line"] == "4" and "unknown key" in parsed["runtime.sed"]["msg"]
    assert "seed" in parsed["runtime.sed"]["msg"]  # lists what is allowed
    assert parsed["runtime.log_interval"]["line"] == "5"
    assert parsed["data.batch_size_per_device"]["line"] == "7"
    assert parsed["model.backbone.type"]["line"] == "10" and "did you mean 'vovnet'" in parsed["model.backbone.type"]["msg"]
    assert all(p["file"] == str(bad) for p in parsed.values())


def test_unknown_component_suggests_the_closest_name(tmp_path):
    bad = write(tmp_path / "bad.yaml", f"""
        _base_: {DEMO}
        model:
          backbone:
            type: vovnte
    """)
    (line,) = errors_of(bad)
    assert line.startswith(f"{bad}:5: model.backbone.type: ") and "did you mean 'vovnet'" in line


def test_component_options_are_validated_by_the_registered_params(tmp_path):
    bad = write(tmp_path / "bad.yaml", f"""
        _base_: {DEMO}
        model:
          head:
            num_qeury: 3
        optimization:
          optimizer:
            lr: -1
    """)
    errors = errors_of(bad)
    assert any(e.startswith(f"{bad}:5: model.head.num_qeury: unknown key") for e in errors), errors
    assert any(e.startswith(f"{bad}:8: optimization.optimizer.lr: ") for e in errors), errors


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "name: x\nruntime: [1, 2\n")
    (line,) = errors_of(bad)
    assert line.startswith(f"{bad}:") and "<yaml>" in line


def test_validate_command_exit_code_and_one_line_per_error(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", f"_base_: {DEMO}\nruntime:\n  sed: 1\n")
    assert streampetr_main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:3: runtime.sed: unknown key")
    assert streampetr_main(["validate", "vov_8p"]) == 0


@pytest.mark.parametrize("written, read", [("off", "off"), ("on", "on"), ("'off'", "off"), ("auto", "auto")])
def test_on_off_switches_accept_unquoted_yaml_words(tmp_path, written, read):
    recipe = write(tmp_path / "switch.yaml", f"_base_: {DEMO}\nruntime:\n  progress_bar: {written}\n")
    assert load_recipe(recipe).runtime.progress_bar == read
    assert load_recipe(DEMO, [f"runtime.progress_bar={written}"]).runtime.progress_bar == read


@pytest.mark.parametrize("override, key", [
    (".runtime.max_iters=5", ".runtime.max_iters"),
    ("runtime..max_iters=5", "runtime..max_iters"),
    ("runtime.max_itres=5", "runtime.max_itres"),
    ("runtim.max_iters=5", "runtim"),
])
def test_override_errors_are_attributed_to_the_command_line(override, key):
    (line,) = errors_of(DEMO, [override])
    assert line.startswith(f"<command line>: {key}: "), line


@pytest.mark.parametrize("override, suggestion, allowed", [
    ("model.head.num_qurey=64", "num_query", "embed_dims"),
    ("model.use_grid_msk=true", "use_grid_mask", "backbone"),
    ("optimization.optimizer.weight_decai=0.1", "weight_decay", "lr"),
    ("runtime.max_itres=5", "max_iters", "log_interval"),
])
def test_unknown_keys_get_the_allowed_list_and_a_close_match(override, suggestion, allowed):
    (line,) = errors_of(DEMO, [override])
    match = re.search(r"unknown key \(did you mean '(\w+)'\? allowed: (.*)\)$", line)
    assert match, line
    assert match.group(1) == suggestion
    listed = match.group(2).split(", ")
    assert suggestion in listed and allowed in listed and override.split("=")[0].split(".")[-1] not in listed


def test_cp_names_the_copy_after_its_file(tmp_path, capsys):
    dest = tmp_path / "my.yaml"
    assert streampetr_main(["cp", "vov_8p", str(dest)]) == 0
    copy = load_recipe(dest)
    assert copy.name == "my" and copy.work_dir() == "work_dirs/my"
    assert copy.model.backbone == load_recipe("vov_8p").model.backbone
    assert streampetr_main(["cp", "vov_8p", str(dest)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {dest}: exists (use --force to overwrite it)"
