"""`duet-r1`: R1's post-training path on CPU in one command (framework/posttrain/driver.py).

    duet-r1                                  # demo: 2-digit addition, pre-train -> SFT -> GRPO -> distil
    duet-r1 posttrain=ci grpo_steps=10       # another preset of configs/posttrain/, any key overridden
    duet-r1 task=sorting loss_agg=dapo dynamic_sampling=true epsilon_high=0.28
    duet-r1 --cfg                            # print the composed config and exit
    torchrun --nproc-per-node 4 -m launch.r1 parallel.dp=4 parallel.ep=2    # on a layout (gloo)

Prints greedy accuracy and mean reward after every stage, one line per GRPO step, and writes into
run_dir: grpo.jsonl (one record per GRPO step), summary.json (every stage's numbers) and the plots
reward.png, accuracy.png, response_length.png over the RL steps. Every bad input (an unknown key,
malformed SFT rows, group_size 1, a prompt longer than the context, a reward that fails on a dry
sample) is one line and exit status 2 before anything trains.

Layouts: every model is built by parallelize() on `parallel.*` / `engine.*` (duet-train's keys).
A layout of several ranks runs under torchrun, one worker per rank (gloo on the CPU); rank 0
prints and writes the outputs, every rank computes the same global numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from launch.run import (
    EXIT_BAD_INPUT,
    ConfigError,
    _explain_hydra_error,
    _unknown_keys,
    config_dir,
    run_dir_problem,
)

USAGE = __doc__.split("\n\n", 2)[1]


def fail(lines: list[str]) -> int:
    for line in lines:
        print(f"duet-r1: error: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT


def presets() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "posttrain").glob("*.yaml"))


def compose(overrides: list[str]):
    """configs/posttrain/<preset>.yaml (posttrain=<preset>, default demo) + overrides -> PosttrainConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from framework.posttrain.config import PosttrainConfig

    preset = "demo"
    rest = []
    for item in overrides:
        if item.startswith("posttrain="):
            preset = item.split("=", 1)[1]
        else:
            rest.append(item)
    if preset not in presets():
        raise ConfigError(f"unknown posttrain preset {preset!r}; choose one of {', '.join(presets())}")
    ConfigStore.instance().store(name="r1_schema", node=PosttrainConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir() / "posttrain"), version_base="1.3"):
            composed = hydra_compose(config_name=preset, overrides=rest)
        extra = _unknown_keys(OmegaConf.to_container(composed, resolve=False), PosttrainConfig)
        if extra:
            raise ConfigError(f"unknown key {extra[0]}; check the spelling (`duet-r1 --cfg` lists every key)")
        return OmegaConf.to_object(composed)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError, KeyError) as err:
        raise ConfigError(_explain_hydra_error(err).replace("duet-train", "duet-r1")) from None
    except Exception as err:  # Hydra's own exception types vary between versions
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            raise ConfigError(_explain_hydra_error(err).replace("duet-train", "duet-r1")) from None
        raise


def input_problems(c) -> list[str]:
    """Everything checkable before training: the config, the SFT rows, prompt lengths, the rewards."""
    from framework.errors import DataError
    from framework.posttrain.config import posttrain_problems
    from framework.posttrain.rewards import check_rewards
    from framework.posttrain.sft import encode, length_problems, load_rows
    from framework.posttrain.tasks import build_task

    lines = posttrain_problems(c)
    if lines:
        return lines
    if problem := run_dir_problem(c.run_dir):
        return [problem]
    if c.sft_data:
        try:
            lines += length_problems(load_rows(c.sft_data), c.policy.max_seq_len)
        except DataError as err:
            lines.append(str(err))
    task = build_task(c.task, c.digits)
    problems = task.problems(256, seed=c.seed)
    longest = max(problems, key=lambda p: len(encode(p.prompt)))
    if len(encode(longest.prompt)) + c.max_new_tokens > c.policy.max_seq_len:
        lines.append(f"prompt {longest.prompt!r}: {len(encode(longest.prompt))} tokens + max_new_tokens="
                     f"{c.max_new_tokens} exceed posttrain.policy.max_seq_len={c.policy.max_seq_len}; "
                     "raise it or lower max_new_tokens")
    return lines + check_rewards(c.rewards, task, problems[0])


def write_outputs(c, result) -> Path:
    from framework.plots import write_lines

    run_dir = Path(c.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "grpo.jsonl", "w") as f:
        for record in result.grpo:
            f.write(json.dumps(record) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"stages": result.stages,
                                                      "distilled_rows": result.distilled_rows}, indent=1))
    steps = [(r["step"] + 1, r) for r in result.grpo]
    write_lines({"mean reward": [(s, r["reward"]) for s, r in steps],
                 "accuracy reward": [(s, r["reward_accuracy"]) for s, r in steps if "reward_accuracy" in r]},
                run_dir / "reward.png", title=f"GRPO on {c.task}: reward of the sampled responses")
    write_lines({"greedy accuracy (held out)": [(s, r["accuracy"]) for s, r in steps if "accuracy" in r]},
                run_dir / "accuracy.png",
                title=f"GRPO on {c.task}: greedy accuracy on {c.eval_prompts} prompts")
    write_lines({"mean response length": [(s, r["response_len"]) for s, r in steps]},
                run_dir / "response_length.png", title="GRPO: response length (tokens)")
    return run_dir


def layout_mesh(c):
    """Join torchrun's process group (gloo: the post-training path runs on the CPU) and build c's
    layout on it."""
    from parallel.mesh import Layout, build_mesh, init_distributed

    init_distributed("gloo")
    return build_mesh(Layout.from_config(c.parallel))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        print("presets: " + ", ".join(presets()))
        return 0
    flags = [a for a in args if a.startswith("-") and a != "--cfg"]
    if flags:
        return fail([f"unknown option {flags[0]}; use key=value overrides, --cfg or --help"])
    try:
        c = compose([a for a in args if a != "--cfg"])
    except ConfigError as err:
        return fail([str(err)])
    if "--cfg" in args:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(c)))
        return 0
    lines = input_problems(c)
    if lines:
        return fail(lines)

    import os

    import torch

    from framework.config import world_size
    from framework.errors import DataError, TrainingError
    from framework.posttrain.config import train_config
    from framework.posttrain.driver import run
    from launch.spawn import in_torchrun_worker

    world = world_size(train_config(c))
    started = int(os.environ["WORLD_SIZE"]) if in_torchrun_worker() else 1
    if started != world:
        return fail([f"the layout needs parallel.pp * parallel.dp = {world} ranks and {started} "
                     f"{'was' if started == 1 else 'were'} started; run torchrun --nproc-per-node {world} "
                     "-m launch.r1 ... (or change the layout)"])
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        mesh = layout_mesh(c) if world > 1 else None
        lead = mesh is None or mesh.rank == 0
        result, _ = run(c, mesh, say=print if lead else lambda line: None)
    except (DataError, TrainingError) as err:
        return fail([str(err)])
    if not lead:
        return 0
    run_dir = write_outputs(c, result)
    print(f"duet-r1: wrote grpo.jsonl, summary.json, reward.png, accuracy.png, response_length.png "
          f"in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
