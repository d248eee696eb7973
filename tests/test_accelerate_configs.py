"""The example accelerate configs (examples/accelerate/) read as `accelerate launch` reads them.

Each file goes through accelerate's own config loader and launch-argument checks, and the FSDP and
DeepSpeed ones build the plugin a launched process builds from them (DeepSpeed itself need not be
installed for that).
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
    prepare_deepspeed_cmd_env,
    prepare_multi_gpu_env,
)

CONFIGS = Path(__file__).parents[1] / "examples" / "accelerate"
EXPECTED = {"ddp-cpu": DistributedType.MULTI_CPU, "ddp-gpu": DistributedType.MULTI_GPU,
            "fsdp": DistributedType.FSDP, "deepspeed-zero2": DistributedType.DEEPSPEED,
            "deepspeed-zero3": DistributedType.DEEPSPEED}


def launch_arguments(path: Path):
    """The arguments `accelerate launch --config_file PATH` runs with."""
    parsed = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    arguments, _, _ = _validate_launch_command(parsed)
    return arguments


def test_every_example_config_is_tested() -> None:
    assert sorted(path.stem for path in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_names_only_launch_options(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == EXPECTED[name]
    # precision is --dtype: accelerate's autocast would reach the student's forward only
    assert config.mixed_precision == "no"
    options = {action.dest for action in launch_command_parser()._actions}
    nested = {**yaml.safe_load(path.read_text()).get("fsdp_config", {}),
              **yaml.safe_load(path.read_text()).get("deepspeed_config", {})}
    assert set(nested) <= options, set(nested) - options
    arguments = launch_arguments(path)
    assert arguments.num_processes >= 2


def test_fsdp_config_builds_an_fsdp2_plugin() -> None:
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(launch_arguments(CONFIGS / "fsdp.yaml"))):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is not None and plugin.reshard_after_forward
    assert not plugin.cpu_ram_efficient_loading


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_build_a_zero_plugin(stage: int) -> None:
    arguments = launch_arguments(CONFIGS / f"deepspeed-zero{stage}.yaml")
    arguments.deepspeed_fields_from_accelerate_config = ""  # set by `accelerate launch` itself
    _, environment = prepare_deepspeed_cmd_env(arguments)
    with mock.patch.dict(os.environ, environment):
        plugin = DeepSpeedPlugin()
    settings = plugin.deepspeed_config
    assert plugin.zero_stage == stage and settings["zero_optimization"]["stage"] == stage
    # safesteer accumulates its own micro-batches; DeepSpeed must not divide the loss again
    assert settings["gradient_accumulation_steps"] == 1
    assert settings["gradient_clipping"] == 1.0
    assert not plugin.zero3_init_flag
