"""`duet-train`: compose the Hydra config, validate it, then train.

Hydra stays at this edge (DESIGN.md rule 2): the composed `DictConfig` becomes the typed
`TrainConfig` here and nothing below sees Hydra. We use Hydra's compose API rather than
`@hydra.main` so that every configuration mistake - an unknown preset, an unknown key, a
wrong type - becomes one line naming the key and exit status 2, before anything is written.

    duet-train                                 # tiny preset on the embedded corpus
    duet-train model=small optim.lr=3e-4       # pick a preset, override any key
    duet-train --cfg                           # print the composed config and exit
    duet-train --dry-run                       # validate and print the model size, no training
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

EXIT_BAD_INPUT = 2
USAGE = __doc__.split("\n\n", 2)[2]


class ConfigError(ValueError):
    """A configuration problem, reported as one line."""


def config_dir() -> Path:
    """The Hydra config tree: beside the packages in a checkout or editable install,
    inside the `launch` package in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise ConfigError(f"config tree not found next to {here}; reinstall duet")


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _explain_hydra_error(err: Exception) -> str:
    """Turn Hydra/OmegaConf's multi-line messages into one actionable line."""
    text = str(err).strip()
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        # Hydra wraps the useful OmegaConf error ("Value 'x' could not be converted...")
        key = re.search(r"full_key: ([\w.]+)", str(cause))
        first = str(cause).strip().splitlines()[0]
        if "not in" in first:
            fix = "check the spelling; `duet-train --cfg` lists every key"
        else:
            fix = "give a value of the key's type; `duet-train --cfg` shows every key with its default"
        return f"{key.group(1) + ': ' if key else ''}{first} - {fix}"
    missing = re.search(r"Could not find '([\w/]+)/(\w+)'", text)
    if missing:
        group, option = missing.groups()
        return (f"unknown {group} preset '{option}'; choose one of "
                f"{', '.join(_group_options(group))} (e.g. {group}={_group_options(group)[0]})")
    not_in_struct = re.search(r"Key '(\w+)' not in '(\w+)'|Could not override '([\w.]+)'", text)
    if not_in_struct:
        first = text.splitlines()[0]
        return f"{first} - check the spelling; `duet-train --cfg` lists every key"
    return " ".join(line.strip() for line in text.splitlines() if line.strip() and
                    not line.startswith(("full_key", "object_type", "reference_type")))


def compose(overrides: list[str]):
    """Compose `configs/train.yaml` with command-line overrides into a `TrainConfig`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from framework.config import TrainConfig

    ConfigStore.instance().store(name="duet_schema", node=TrainConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            composed = hydra_compose(config_name="train", overrides=overrides)
        for key in OmegaConf.missing_keys(composed):
            raise ConfigError(f"{key} is required (it is ???); set it, e.g. {key}=...")
        extra = _unknown_keys(OmegaConf.to_container(composed, resolve=False), TrainConfig)
        if extra:
            raise ConfigError(f"unknown key {extra[0]}; check the spelling (`duet-train --cfg` lists "
                              "every key)")
        return OmegaConf.to_object(composed)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError, KeyError) as err:  # Hydra's errors subclass these
        raise ConfigError(_explain_hydra_error(err)) from None
    except Exception as err:  # Hydra's own exception types vary between versions
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            raise ConfigError(_explain_hydra_error(err)) from None
        raise


def _unknown_keys(node: dict, schema: type, prefix: str = "") -> list[str]:
    """Keys in `node` that the dataclass `schema` lacks (`+key=value` slips past Hydra)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    found = []
    for key, value in node.items():
        if key not in hints:
            found.append(prefix + key)
        elif isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            found += _unknown_keys(value, hints[key], f"{prefix}{key}.")
    return found


def fail(lines: list[str]) -> int:
    for line in lines:
        print(f"duet-train: error: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        print("config groups: " + "; ".join(
            f"{g}: {', '.join(_group_options(g))}" for g in
            ("model", "optim", "data", "precision", "parallel", "launch", "logging", "engine",
             "cluster")))
        return 0
    show_cfg = "--cfg" in args
    dry_run = "--dry-run" in args
    overrides = [a for a in args if a not in ("--cfg", "--dry-run")]
    unknown_flags = [a for a in overrides if a.startswith("-")]
    if unknown_flags:
        return fail([f"unknown option {unknown_flags[0]}; use key=value overrides, "
                     "--cfg, --dry-run or --help"])
    try:
        cfg = compose(overrides)
    except ConfigError as err:
        return fail([str(err)])
    if show_cfg:
        import signal

        from omegaconf import OmegaConf

        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `duet-train --cfg | head` ends quietly
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0

    from framework.config import validate

    problems = validate(cfg)
    if problems:
        return fail(problems)
    if dry_run or cfg.launch.dry_run:
        from launch.dry_run import dry_run_report

        print(dry_run_report(cfg))
        return 0
    return launch(cfg, overrides)


def launch(cfg, overrides: list[str]) -> int:
    """Start the run the way `launch.mode` says; every bad input is one line and exit 2."""
    from framework.config import world_size
    from framework.data import DataError, build_data
    from framework.resume import starting_point
    from framework.trainer import TrainingError, train
    from launch import spawn

    mode, world = cfg.launch.mode, world_size(cfg)
    problem = run_dir_problem(cfg.run_dir)
    if problem:  # before anything below creates the folder (the slurm script, the data cache)
        return fail([problem])
    if mode == "slurm":
        return spawn.write_slurm_script(cfg, overrides)
    if mode == "torchrun" and not spawn.in_torchrun_worker():
        return fail(["launch.mode=torchrun but RANK/WORLD_SIZE are not set: start duet-train under "
                     "torchrun (see the README) or use launch=local"])
    try:
        if spawn.in_torchrun_worker():
            if int(os.environ["WORLD_SIZE"]) != world:
                return fail([f"torchrun started {os.environ['WORLD_SIZE']} workers but the layout needs "
                             f"parallel.pp * parallel.dp = {world}; match --nnodes * --nproc-per-node"])
            train(cfg)
            return 0
        if world > 1 or mode != "local":
            problem = _device_problem(cfg, world)
            if problem:
                return fail([problem])
        # Check the run folder and tokenize once here: bad input fails before training (and
        # before any worker starts), and the ranks find the data cache ready. A run folder
        # made by this check is removed again, so a refused run leaves nothing behind.
        run_dir = Path(cfg.run_dir).expanduser()
        created = not run_dir.exists()
        try:
            starting_point(cfg)
            build_data(cfg.data, cfg.model.vocab_size, run_dir / "data")
        except (DataError, TrainingError):
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if world == 1 and mode == "local":
            train(cfg)
            return 0
        return spawn.spawn_local(cfg)
    except (DataError, TrainingError) as err:
        return fail([str(err)])
    except KeyboardInterrupt:
        print("\nduet-train: interrupted; the last completed checkpoint is intact", file=sys.stderr)
        return 130


def run_dir_problem(run_dir: str) -> str | None:
    """Why `run_dir` cannot hold a run, found without leaving anything behind: its nearest
    existing ancestor (itself, if it exists) must be a folder in which a folder can be created
    (a probe folder, removed at once: a permission check alone passes root under /proc)."""
    path = Path(run_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if _exists(p))
    fix = "choose a run_dir in a folder you can write to"
    if not existing.is_dir():
        which = "it" if existing == path else str(existing)
        return f"run_dir={run_dir!r}: {which} is a file, not a folder; {fix}"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".duet-probe-", dir=existing))
    except OSError as err:
        return f"run_dir={run_dir!r}: cannot create a folder in {existing} ({err.strerror or err}); {fix}"
    return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. no search permission on a parent: look further up
        return False


def _device_problem(cfg, world: int) -> str | None:
    import torch

    from framework.trainer import TrainingError, pick_device

    try:
        pick_device(cfg.device)  # the workers' own check, made before they exist
    except TrainingError as err:
        return str(err)
    gpus = torch.cuda.device_count()
    if cfg.launch.mode == "local" and cfg.device != "cpu" and 0 < gpus < world:
        return (f"launch.mode=local needs one GPU per rank: {world} ranks, {gpus} GPUs visible; use "
                "launch=simulated to put every rank on one device, or device=cpu")
    return None


if __name__ == "__main__":
    sys.exit(main())
