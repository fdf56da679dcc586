"""How a multi-process launch is found (flags, JAX_* environment, SLURM) and its bad inputs."""

from __future__ import annotations

import pytest

from fastlora_jax.train.args import run_settings
from fastlora_jax.errors import ConfigError
from fastlora_jax.sharding import MeshConfig
from fastlora_jax.train.distributed import Launch, find_launch


def test_flags_win_over_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert find_launch("10.0.0.1:1234", 2, 1, env) == Launch("10.0.0.1:1234", 2, 1, "flags")
    got = find_launch(None, None, None, env)
    assert (got.coordinator_address, got.num_processes, got.process_id) == ("h:1", 4, 3)


def test_slurm_job_step_and_single_process():
    got = find_launch(None, None, None, {"SLURM_NTASKS": "8", "SLURM_PROCID": "5"})
    assert (got.coordinator_address, got.num_processes, got.process_id) == (None, 8, 5)
    assert find_launch(None, None, None, {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert find_launch(None, None, None, {}) is None


@pytest.mark.parametrize("flags, pattern", [
    (("h:1", 2, None), "process_id missing"),
    ((None, 2, 0), "coordinator_address missing"),
    (("h:1", 2, 2), r"process_id=2 must be in \[0, num_processes=2\)"),
])
def test_incomplete_or_inconsistent_launch_is_one_error(flags, pattern):
    with pytest.raises(ConfigError, match=pattern):
        find_launch(*flags, {})


def test_mesh_flag():
    assert run_settings(({"mesh": "2,-1,1"}, "command line"))[2].mesh == MeshConfig(2, -1, 1)
    with pytest.raises(ConfigError, match="mesh='2,2' is not a mesh.*expected 3 sizes"):
        run_settings(({"mesh": "2,2"}, "command line"))
