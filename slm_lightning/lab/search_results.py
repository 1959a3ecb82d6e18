"""What a search leaves in its folder: ``study.csv``, ``best.yaml``, ``search.png`` and the
``search:`` line, written from the study (every process's trials).

Used by :mod:`slm_lightning.lab.search`.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from loguru import logger
from optuna.trial import FrozenTrial, TrialState

from slm_lightning.errors import ConfigError
from slm_lightning.lab.space import SearchSpace, parse_value
from slm_lightning.lab.study import superseded
from slm_lightning.lab.trial import ConfigFacts, describe_config


@dataclass
class SearchSetup:
    """What every trial of the search shares.

    Args:
        configs: the ``--config`` files.
        overrides: the fit options given to the search.
        facts: the config's facts.
        space: the search space.
        seeds: every trial's seeds.
        objective: ``return_ma``, ``strength`` or ``iqm``.
        budget: ``--trials``.
        grid: frames between two intermediate values.
        folder: the search folder.
    """

    configs: list[str]
    overrides: list[str]
    facts: ConfigFacts
    space: SearchSpace
    seeds: list[int]
    objective: str
    budget: int
    grid: int
    folder: Path


# --- results ------------------------------------------------------------------------------


def write_study_csv(study: optuna.Study, path: Path, seeds: list[int]) -> None:
    """``study.csv``: one row per trial of the study (from every process sharing it): number,
    state, objective, the sampled values, each session's final return MA, frames, seconds,
    its folder and what became of it.

    Args:
        study: the study.
        path: the file.
        seeds: the sessions' seeds (a column each).
    """
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("over_budget")]
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    header = ["number", "state", "objective", *keys]
    header += [f"return_ma_seed{seed}" for seed in seeds]
    header += ["frames", "seconds", "retry_of", "folder", "error"]
    rows = []
    for t in trials:
        finals = list(t.user_attrs.get("return_ma", [])) + [None] * len(seeds)
        rows.append(
            [t.number, t.state.name, t.value]
            + [t.params.get(k) for k in keys]
            + finals[: len(seeds)]
            + [t.user_attrs.get(k) for k in ("frames", "seconds", "retry_of", "folder", "error")]
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes may share DIR
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    tmp.replace(path)  # a reader never sees half a table


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[leaf] = value


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def override_pairs(overrides: list[str]) -> list[tuple[str, str]]:
    """``--key=value`` and ``--key value`` command-line options as (``key``, ``value``).

    Args:
        overrides: fit options.
    """
    pairs, i = [], 0
    while i < len(overrides):
        arg = overrides[i]
        if "=" in arg:
            key, text = arg.split("=", 1)
            i += 1
        elif i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            key, text = arg, overrides[i + 1]
            i += 2
        else:
            raise ConfigError(f"{arg}: an option without a value")
        pairs.append((key.removeprefix("--"), text))
    return pairs


def best_config(configs: list[str], overrides: list[str], values: dict[str, Any]) -> dict:
    """The search's config with its overrides and the best values applied, as one YAML tree.

    Args:
        configs: the ``--config`` files (later ones override earlier ones, as in fit).
        overrides: the fit options given to the search.
        values: the best trial's values by dotted key.
    """
    tree: dict[str, Any] = {}
    for config in configs:
        _merge(tree, yaml.safe_load(Path(config).read_text()) or {})
    for key, text in override_pairs(overrides):
        _set_dotted(tree, key, parse_value(text))
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return tree


def write_best_yaml(study: optuna.Study, setup: SearchSetup, path: Path) -> FrozenTrial | None:
    """``best.yaml``: the config with the best trial's values, ready for ``slm-lab fit`` or
    ``slm-lab trial``; checked to parse to what the best trial's sessions ran.

    Args:
        study: the study.
        setup: the search's setup.
        path: the file.
    """
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return None
    best = max(complete, key=lambda t: t.value)
    values = setup.space.values(best.params)
    tree = best_config(setup.configs, setup.overrides, values)
    header = [
        f"# The best of the search in {setup.folder} (study {study.study_name}): trial "
        f"{best.number}, {setup.objective} {best.value:.6g} over seeds {setup.seeds}.",
        f"# Made from {', '.join(setup.configs)}"
        + (f" with {' '.join(setup.overrides)}" if setup.overrides else "")
        + "; searched: "
        + ", ".join(f"{k}={v}" for k, v in values.items()),
        "# The best of many noisy trials is optimistic: `slm-lab trial --config` this file "
        "with new --seeds to see what it is worth.",
    ]
    text = "\n".join(header) + "\n" + yaml.safe_dump(tree, sort_keys=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.yaml")
    tmp.write_text(text)
    ran = describe_config(setup.configs, setup.overrides + setup.space.overrides(best.params))
    written = describe_config([str(tmp)], [])
    differ = [
        k
        for k, v in ran.values.items()
        if k != "config" and v != written.values.get(k) and "slm-lab-trial-check-" not in str(v)
    ]  # (paths under the scratch folder of describe_config differ by construction)
    if differ:
        logger.error(
            f"best.yaml: not written; it would not set {', '.join(differ)} as trial "
            f"{best.number} ran them (left in {tmp})"
        )
        return best
    tmp.replace(path)
    return best


def plot_search(study: optuna.Study, path: Path) -> bool:
    """``search.png``: Optuna's optimisation history beside its parameter importances (where
    enough trials completed to compute them). False when no trial completed.

    Args:
        study: the study.
        path: the file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as ovm

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return False
    images = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # PED-ANOVA on a handful of trials: "importances will be equal", as drawn.
        warnings.simplefilter("ignore", UserWarning)
        panels = [lambda: ovm.plot_optimization_history(study)]
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
            # PED-ANOVA needs no scikit-learn (fANOVA, Optuna's default, does).
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            panels.append(lambda: ovm.plot_param_importances(study, evaluator=evaluator))
        for draw in panels:
            try:
                axes = draw()
            except (ValueError, RuntimeError, ImportError) as err:  # e.g. a constant objective
                logger.warning(f"search.png: {err}")
                continue
            figure = axes.figure
            figure.set_size_inches(7, 5)
            buffer = io.BytesIO()
            # bbox "tight": Optuna puts the history's legend outside the axes.
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            buffer.seek(0)
            images.append(plt.imread(buffer, format="png"))
    height = max(image.shape[0] for image in images)
    padded = [
        np.pad(im, ((0, height - im.shape[0]), (0, 0), (0, 0)), constant_values=1.0)
        for im in images
    ]
    plt.imsave(path, np.hstack(padded))
    return True


def search_line(study: optuna.Study, best: FrozenTrial | None, space: SearchSpace) -> str:
    """``search: trials=30 complete=22 pruned=7 failed=1 best=231.4 (trial 12) params={…}``.

    Args:
        study: the study.
        best: its best trial, or None.
        space: the search space (to show the values as configured).
    """
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("over_budget")]
    trials = [t for t in trials if t.number not in superseded(trials)]
    count = {state: sum(t.state == state for t in trials) for state in TrialState}
    line = (
        f"search: trials={len(trials)} complete={count[TrialState.COMPLETE]} "
        f"pruned={count[TrialState.PRUNED]} failed={count[TrialState.FAIL]}"
    )
    if count[TrialState.RUNNING]:
        line += f" running={count[TrialState.RUNNING]}"
    if count[TrialState.WAITING]:
        line += f" queued={count[TrialState.WAITING]}"
    if best is None:
        return line + " best=None"
    params = ", ".join(
        f"{k.removeprefix('model.init_args.')}: {v}" for k, v in space.values(best.params).items()
    )
    return line + f" best={best.value:.4g} (trial {best.number}) params={{{params}}}"


def write_results(study: optuna.Study, setup: SearchSetup) -> str:
    """Write ``study.csv``, ``best.yaml`` and ``search.png``; return the search line.

    Args:
        study: the study.
        setup: the search's setup.
    """
    write_study_csv(study, setup.folder / "study.csv", setup.seeds)
    best = write_best_yaml(study, setup, setup.folder / "best.yaml")
    plot_search(study, setup.folder / "search.png")
    return search_line(study, best, setup.space)
