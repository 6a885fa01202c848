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

import re
import sys
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
        return f"{key.group(1) + ': ' if key else ''}{first}"
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


def dry_run_report(cfg) -> str:
    """What a run would build, without allocating it: the model is built on the meta device."""
    import torch

    from framework.model import Transformer, count_params

    with torch.device("meta"):
        model = Transformer(cfg.model)
    counts = count_params(model)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return "\n".join([
        f"model {cfg.model.name}: {counts['total']:,} parameters "
        f"({counts['activated']:,} activated per token, MTP {counts['mtp']:,})",
        f"fp32 weights + grads + AdamW moments: {counts['total'] * 16 / 2**30:.2f} GiB",
        f"batch: {cfg.data.batch_size} x {cfg.data.seq_len} = {tokens:,} tokens per step, "
        f"{cfg.steps} steps, run folder {cfg.run_dir}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        print("config groups: " + "; ".join(
            f"{g}: {', '.join(_group_options(g))}" for g in
            ("model", "optim", "data", "precision", "parallel", "launch", "logging")))
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
        print(dry_run_report(cfg))
        return 0

    from framework.data import DataError
    from framework.trainer import TrainingError, train

    try:
        train(cfg)
    except (DataError, TrainingError) as err:
        return fail([str(err)])
    except KeyboardInterrupt:
        print("\nduet-train: interrupted; the last completed checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
