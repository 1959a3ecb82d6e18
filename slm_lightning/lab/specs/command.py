"""``slm-lab SPEC_FILE SPEC_NAME MODE``: an SLM Lab spec file run as SLM Lab runs it.

Data path: :func:`run_main` reads the command line (:func:`parse_command`) → for a new run,
``lab/specs/importer.py:import_spec`` maps the spec to our config → lab/trial.py:claim_dir
(``runs/<SPEC_NAME>/<mode>-<timestamp>/``) → :func:`write_import` (``<SPEC_NAME>.yaml``, the
config with a header naming the source spec, and ``import.txt``, the import report) → the
mode's command on that config: ``train`` a trial (lab/trial.py), ``dev`` one fit with
``callbacks/dev.yaml``, ``search`` a search (lab/search.py) over ``space.yaml``;
``train@RUN`` reruns a trial's command in its folder, which resumes it; ``enjoy@RUN`` /
``eval@RUN`` run ``validate`` on the best checkpoint of RUN (:func:`evaluated_checkpoint`).

The config is named after the spec (not ``config.yaml``, which each fit writes for itself):
its stem names the trial in ``trial.json``, the study of a search and the loggers' runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from loguru import logger

import slm_lightning
from slm_lightning.errors import ConfigError
from slm_lightning.lab.trial import claim_dir

if TYPE_CHECKING:
    from slm_lightning.lab.specs.importer import SpecImport

USAGE = "slm-lab SPEC_FILE SPEC_NAME MODE [-s KEY=VALUE …] [fit options …]"
MODES = ("train", "dev", "search", "enjoy@RUN", "eval@RUN", "train@latest", "train@RUN")
# The presets of the repository's callbacks/ folder, found beside the package so that a spec
# runs from any working directory (an SLM Lab checkout, where its spec paths are relative).
PRESETS = Path(slm_lightning.__file__).resolve().parents[1] / "callbacks"
IMPORT_REPORT = "import.txt"
SPACE_FILE = "space.yaml"


@dataclass
class SpecCommand:
    """``slm-lab SPEC_FILE SPEC_NAME MODE`` as read off the command line.

    Args:
        spec_file: the spec file.
        spec_name: the spec's name in the file.
        mode: ``train``, ``dev``, ``search``, ``enjoy`` or ``eval``.
        target: what follows ``@`` in MODE (``latest``, a folder or a checkpoint), or None.
        sets: ``-s KEY=VALUE`` substitutions of the spec's ``${KEY}`` placeholders.
        overrides: the options after MODE, passed on to the trial, search or fit.
    """

    spec_file: Path
    spec_name: str
    mode: str
    target: str | None = None
    sets: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


def _bad_mode(mode: str) -> ConfigError:
    return ConfigError(f"MODE must be one of {', '.join(MODES)}; got {mode!r}")


def parse_command(argv: list[str]) -> SpecCommand:
    """Read ``SPEC_FILE SPEC_NAME MODE`` (first; ``-s KEY=VALUE`` anywhere) and the options
    passed on.

    Args:
        argv: the arguments after ``slm-lab`` (or ``slm-lab run``).
    """
    positional: list[str] = []
    sets: dict[str, str] = {}
    overrides: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("-s", "--set") or arg.startswith(("-s=", "--set=")):
            pair = arg.split("=", 1)[1] if arg.startswith(("-s=", "--set=")) else next(args, "")
            key, equals, value = pair.partition("=")
            if not key or not equals:
                raise ConfigError(f"-s expects KEY=VALUE, got {pair!r}")
            sets[key] = value
        elif len(positional) < 3:
            if arg.startswith("-"):
                raise ConfigError(
                    f"{arg}: expected {USAGE} (SPEC_FILE SPEC_NAME MODE first); "
                    f"got {len(positional)} of them"
                )
            positional.append(arg)
        else:
            overrides.append(arg)
    if len(positional) < 3:
        missing = ["SPEC_FILE", "SPEC_NAME", "MODE"][len(positional) :]
        raise ConfigError(f"{' '.join(missing)} missing: expected {USAGE}")
    spec_file, spec_name, mode_text = positional
    mode, at, target = mode_text.partition("@")
    if mode not in ("train", "dev", "search", "enjoy", "eval") or (at and not target):
        raise _bad_mode(mode_text)
    if at and mode in ("dev", "search"):
        raise _bad_mode(mode_text)
    if mode in ("enjoy", "eval") and not at:
        raise ConfigError(
            f"MODE {mode} evaluates a run: {mode}@RUN (a run or trial folder, or a .ckpt)"
        )
    if not Path(spec_file).is_file():
        raise ConfigError(f"SPEC_FILE {spec_file}: no such file")
    return SpecCommand(
        spec_file=Path(spec_file),
        spec_name=spec_name,
        mode=mode,
        target=target or None,
        sets=sets,
        overrides=overrides,
    )


def write_import(imported: SpecImport, folder: Path) -> Path:
    """Write the imported config (``<SPEC_NAME>.yaml``) and its report (``import.txt``) into
    ``folder``; log the report's keys without equivalent, one warning each. Returns the config.

    Args:
        imported: what the importer made of the spec.
        folder: the run, trial or search folder.
    """
    config = folder / f"{imported.name}.yaml"
    config.write_text(imported.yaml_text())
    (folder / IMPORT_REPORT).write_text("".join(f"{line}\n" for line in imported.report.lines()))
    for line in imported.report.unsupported:
        logger.warning(f"{imported.source} {imported.name}: {line}")
    report = imported.report
    logger.info(
        f"{imported.source} {imported.name} -> {config}: {len(report.exact)} keys exact, "
        f"{len(report.converted)} converted, {len(report.unsupported)} without equivalent "
        f"(see {folder / IMPORT_REPORT})"
    )
    return config


def preset(name: str) -> str:
    """The path of a preset of the repository's ``callbacks/`` folder (``dev.yaml``).

    Args:
        name: the preset's file name.
    """
    path = PRESETS / name
    if not path.is_file():
        raise ConfigError(f"callbacks/{name}: not found beside the package ({path})")
    return str(path)


def split_configs(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--config FILE`` options among the passed-on options (presets added after the
    spec's config, ``--config callbacks/wandb.yaml``), and the others.

    Args:
        overrides: the options after MODE.
    """
    configs: list[str] = []
    rest: list[str] = []
    args = iter(overrides)
    for arg in args:
        if arg == "--config":
            configs.append(next(args, ""))
        elif arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return configs, rest


def _seed(config: dict, overrides: list[str]) -> int | None:
    """The config's ``seed_everything`` with a ``--seed_everything=N`` option applied."""
    seed = config.get("seed_everything")
    for arg in overrides:
        if arg.startswith("--seed_everything="):
            seed = yaml.safe_load(arg.split("=", 1)[1])
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def run_trial(configs: list[str], overrides: list[str], folder: Path, seeds: list[int]) -> None:
    """``slm-lab trial`` of ``configs`` in ``folder``: the trial's command is recorded there
    first, which makes the folder (already holding the config) the trial's own, and the same
    call later resumes it.

    Args:
        configs: the config files.
        overrides: the fit options.
        folder: the trial folder.
        seeds: the sessions' seeds.
    """
    from slm_lightning.lab.trial import STATE_FILE, build_parser, trial_main

    args = [a for c in configs for a in ("--config", c)]
    args += ["--seeds", *map(str, seeds), "--dir", str(folder), *overrides]
    state = folder / STATE_FILE
    if not state.is_file():  # lab/trial.py's record of what the trial in a folder runs
        fit_options = build_parser().parse_known_args(args)[1]  # without --workers …
        command = {"configs": configs, "overrides": fit_options, "seeds": seeds}
        state.write_text(json.dumps(command, indent=2) + "\n")
    trial_main(args)


def train(imported: SpecImport, overrides: list[str]) -> None:
    """``train``: a trial of the spec's ``meta.max_session`` sessions in
    ``runs/<SPEC_NAME>/train-<timestamp>/``.

    Args:
        imported: what the importer made of the spec.
        overrides: the options after MODE.
    """
    from slm_lightning.lab.trial import resolve_seeds

    extra, overrides = split_configs(overrides)
    for arg in overrides:
        option = arg.split("=", 1)[0]
        if option in ("--sessions", "--seeds", "--dir"):
            raise ConfigError(
                f"{option}: train runs the spec's meta.max_session sessions "
                f"({imported.max_session}) in runs/{imported.name}/train-<timestamp>"
            )
    seeds = resolve_seeds(None, imported.max_session, _seed(imported.config, overrides))
    folder = claim_dir(imported.name, "train")
    with released_on_error(folder):
        configs = [str(write_import(imported, folder)), *extra]
        run_trial(configs, overrides, folder, seeds)


def resume(spec_name: str, target: str, overrides: list[str]) -> None:
    """``train@latest`` / ``train@RUN``: rerun a trial's command in its folder, which keeps
    its finished sessions and resumes the others from their ``last.ckpt``. The trial refuses
    other options than it ran with.

    Args:
        spec_name: the spec's name.
        target: ``latest`` (the newest ``runs/<SPEC_NAME>/train-*``) or the trial folder.
        overrides: the options after MODE, as the trial first ran with them.
    """
    from slm_lightning.lab.trial import STATE_FILE

    if target == "latest":
        folders = sorted(p for p in (Path("runs") / spec_name).glob("train-*") if p.is_dir())
        if not folders:
            raise ConfigError(f"train@latest: no runs/{spec_name}/train-* trial to resume")
        folder = folders[-1]
    else:
        folder = Path(target)
    state = folder / STATE_FILE
    if not state.is_file():
        raise ConfigError(f"train@{target}: {folder} holds no trial ({STATE_FILE}) to resume")
    recorded = json.loads(state.read_text())
    if not (folder / f"{spec_name}.yaml").is_file():
        raise ConfigError(f"train@{target}: {folder} is not a trial of {spec_name}")
    extra, overrides = split_configs(overrides)
    configs = [recorded["configs"][0], *extra]
    logger.info(f"train@{target}: resuming the trial in {folder}")
    run_trial(configs, overrides, folder, recorded["seeds"])


def dev(imported: SpecImport, overrides: list[str]) -> None:
    """``dev``: one short fit with the dev preset (``callbacks/dev.yaml``: a 5000-frame
    budget, every metrics row printed) in ``runs/<SPEC_NAME>/dev-<timestamp>/``.

    Args:
        imported: what the importer made of the spec.
        overrides: the options after MODE (``--model.init_args.max_frames=…`` wins).
    """
    from slm_lightning.cli import run_cli

    folder = claim_dir(imported.name, "dev")
    with released_on_error(folder):
        config = write_import(imported, folder)
        args = ["--config", str(config), "--config", preset("dev.yaml")]
        run_cli(["fit", *args, f"--trainer.default_root_dir={folder}", *overrides])


def search(imported: SpecImport, overrides: list[str]) -> None:
    """``search``: a search over the spec's ``search`` section (``space.yaml``) with
    ``meta.max_trial`` trials of ``meta.max_session`` sessions; ``meta.search_scheduler``
    picks the halving pruner and, as in SLM Lab, one session per trial.

    Args:
        imported: what the importer made of the spec.
        overrides: the options after MODE, passed on to ``slm-lab search``.
    """
    from slm_lightning.lab.search import search_main

    if imported.space is None:
        raise ConfigError(
            f"search: spec {imported.name} in {imported.source} has no search section"
        )
    if imported.max_trial is None:
        raise ConfigError(
            f"search: spec {imported.name} in {imported.source} sets no meta.max_trial"
        )
    scheduled = imported.search_scheduler is not None
    folder = claim_dir(imported.name, "search")
    with released_on_error(folder):
        config = write_import(imported, folder)
        space = folder / SPACE_FILE
        space.write_text(yaml.safe_dump(imported.space, sort_keys=False))
        args = ["--config", str(config), "--space", str(space)]
        args += ["--trials", str(imported.max_trial)]
        args += ["--sessions", str(1 if scheduled else imported.max_session)]
        args += ["--pruner", "halving" if scheduled else "median", "--dir", str(folder)]
        search_main([*args, *overrides])


def _final_return_ma(session: dict) -> float:
    value = (session.get("metrics") or {}).get("final_return_ma")
    return -math.inf if value is None else float(value)


def evaluated_checkpoint(run: Path) -> tuple[Path, Path]:
    """The config and checkpoint ``enjoy@RUN`` evaluates: for a trial folder, the session with
    the best final return MA in ``trial.json``; for a run folder, its ``checkpoints/best.ckpt``,
    else ``last.ckpt``; a checkpoint file as given. The config is the run's ``config.yaml``.

    Args:
        run: a run folder, a trial folder or a ``.ckpt`` file.
    """
    if run.is_file() and run.suffix == ".ckpt":
        folder = run.parent.parent if run.parent.name == "checkpoints" else run.parent
        checkpoint = run
    elif (run / "trial.json").is_file():
        sessions = json.loads((run / "trial.json").read_text())["sessions"]
        if not sessions:
            raise ConfigError(f"@{run}: the trial has no session")
        best = max(sessions, key=_final_return_ma)  # the first of equals
        return evaluated_checkpoint(run / best["folder"])
    elif (run / "config.yaml").is_file():
        folder = run
        checkpoints = [run / "checkpoints" / name for name in ("best.ckpt", "last.ckpt")]
        checkpoint = next((c for c in checkpoints if c.is_file()), checkpoints[-1])
        if not checkpoint.is_file():
            raise ConfigError(f"@{run}: no checkpoints/best.ckpt or last.ckpt to evaluate")
    else:
        raise ConfigError(
            f"@{run}: RUN must be a run folder (config.yaml), a trial folder (trial.json) "
            "or a .ckpt file"
        )
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"@{run}: no config.yaml in {folder} to evaluate the checkpoint with")
    return folder / "config.yaml", checkpoint


def evaluate(spec_name: str, mode: str, target: str, overrides: list[str]) -> None:
    """``enjoy@RUN`` / ``eval@RUN``: ``slm-lab validate`` of RUN's best checkpoint on the config
    it ran with, in ``runs/<SPEC_NAME>/<mode>-<timestamp>/``; ``enjoy`` also records videos
    (``callbacks/video.yaml``; an env that cannot render is one warning).

    Args:
        spec_name: the spec's name.
        mode: ``enjoy`` or ``eval``.
        target: RUN.
        overrides: the options after MODE, passed on to ``validate``.
    """
    from slm_lightning.cli import run_cli

    config, checkpoint = evaluated_checkpoint(Path(target))
    logger.info(f"{mode}@{target}: evaluating {checkpoint}")
    args = ["--config", str(config)]
    if mode == "enjoy":
        args += ["--config", preset("video.yaml")]
    folder = claim_dir(spec_name, mode)
    args += [f"--ckpt_path={checkpoint}", f"--trainer.default_root_dir={folder}"]
    # The run's resolved config names its own folder as the loggers' save_dir, and Lightning
    # writes the evaluation's config.yaml into the first logger's folder: without new loggers
    # the evaluation would overwrite the run's config.yaml and metrics.
    args.append("--trainer.logger=true")
    with released_on_error(folder):
        run_cli(["validate", *args, *overrides])


@contextlib.contextmanager
def released_on_error(folder: Path) -> Iterator[None]:
    """Remove ``folder`` again when the command fails before anything but the files written
    here is in it (a config the trial or fit refused): bad input leaves nothing behind.

    Args:
        folder: the folder lab/trial.py:claim_dir made for the command.
    """
    from slm_lightning.lab.trial import STATE_FILE

    try:
        yield
    except BaseException:
        names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        ours = {IMPORT_REPORT, SPACE_FILE, STATE_FILE}
        ours |= {n for n in names if n.endswith(".yaml") and n != "config.yaml"}
        if names <= ours:
            shutil.rmtree(folder, ignore_errors=True)
            for parent in (folder.parent, folder.parent.parent):  # runs/<SPEC_NAME>, runs
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only where empty
        raise


def run_main(argv: list[str]) -> None:
    """``slm-lab SPEC_FILE SPEC_NAME MODE [-s KEY=VALUE …] [options …]`` (also after ``run``).

    Args:
        argv: the arguments after ``slm-lab`` (or ``slm-lab run``).
    """
    if "-h" in argv or "--help" in argv:
        print(f"usage: {USAGE}\nMODE: {', '.join(MODES)} (see the README, SLM Lab spec files)")
        return
    command = parse_command(argv)
    if command.mode in ("enjoy", "eval"):
        target = str(command.target)  # parse_command requires one
        evaluate(command.spec_name, command.mode, target, command.overrides)
        return
    if command.mode == "train" and command.target is not None:
        if command.sets:
            raise ConfigError(f"-s: train@{command.target} resumes with the config it ran with")
        resume(command.spec_name, command.target, command.overrides)
        return
    from slm_lightning.lab.specs import importer

    imported = importer.import_spec(command.spec_file, command.spec_name, sets=command.sets)
    {"train": train, "dev": dev, "search": search}[command.mode](imported, command.overrides)
