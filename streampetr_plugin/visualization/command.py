"""``streampetr visualize``: draw what a run predicted for one validation sample, or its scene's tracks.

A run directory holds the resolved recipe (``recipe.yaml``, written by the trainer) and one
predictions file per evaluation (``eval/iter_<n>/predictions.npz``, see
:mod:`streampetr_plugin.evaluation.predictions`). The picture uses the original camera images and
calibration of the sample, its ground-truth annotations and the newest predictions (coloured by track
when the evaluation tracked). ``--trajectories`` draws the bird's-eye paths of the tracks of the
sample's scene instead (:mod:`streampetr_plugin.visualization.trajectories`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from streampetr_plugin.evaluation.predictions import list_predictions, load_predictions
from streampetr_plugin.plugins import PluginHost
from streampetr_plugin.visualization.dataset_pictures import (
    VisualizationError,
    render_dataset_sample,
    render_scene_trajectories,
)

RECIPE_FILE = "recipe.yaml"


def visualize_command(
    run_dir: Union[str, Path],
    sample: Optional[str] = None,
    out: Optional[Union[str, Path]] = None,
    *,
    host: PluginHost,
    trajectories: bool = False,
) -> Path:
    """Render the run's newest predictions for sample token ``sample`` (default: the first sample of
    the val set, in time order) to ``out`` (default: ``sample_<token>.png`` next to the predictions
    file); with ``trajectories`` the tracks of that sample's scene (default file
    ``trajectories_<scene token>.png``). Returns the PNG's path; raises :class:`VisualizationError` with
    what is missing."""
    from streampetr_plugin.config.loader import load_recipe
    from streampetr_plugin.data.build import build_dataset

    run_dir = Path(run_dir)
    recipe_path = run_dir / RECIPE_FILE
    if not recipe_path.is_file():
        raise VisualizationError(f"{recipe_path}: no resolved recipe; is {run_dir} a run directory?")
    found = list_predictions(run_dir)
    if not found:
        raise VisualizationError(
            f"{run_dir}: no predictions (eval/iter_*/predictions.npz); the run has not been evaluated yet"
        )
    iteration, predictions_file = found[-1]
    recipe = load_recipe(recipe_path, host=host)
    dataset = build_dataset(recipe, host.registries, training=False)
    tokens = [info.token for info in dataset.samples]
    if not tokens:
        raise VisualizationError(f"the val set of {recipe_path} is empty")
    token = sample if sample is not None else tokens[0]
    if token not in tokens:
        raise VisualizationError(
            f"sample {token!r} is not in the val set of {recipe_path} ({len(tokens)} samples)"
        )
    predictions = load_predictions(predictions_file)
    if token not in predictions:
        raise VisualizationError(f"{predictions_file} has no predictions for sample {token!r}")
    if trajectories:
        scene = dataset.samples[tokens.index(token)].scene_token
        out_path = Path(out) if out is not None else predictions_file.parent / f"trajectories_{scene}.png"
        return render_scene_trajectories(
            dataset, scene, predictions, out_path,
            title=f"{recipe.name}, iteration {iteration}: tracks of scene {scene}",
        )
    out_path = Path(out) if out is not None else predictions_file.parent / f"sample_{token}.png"
    return render_dataset_sample(
        dataset,
        tokens.index(token),
        predictions[token],
        out_path,
        class_names=recipe.data.class_names,
        title=f"{recipe.name}, iteration {iteration}: sample {token}",
    )
