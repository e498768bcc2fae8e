"""`pecsched up`'s control plane config follows the topology: workers sharing a GPU never
form an SP group (the policy plans with degree 1; the agent refuses such groups too)."""

from __future__ import annotations

import tomllib

from pecsched.up import config_toml


def test_sp_degree_is_one_exactly_when_cuda_workers_share_a_gpu() -> None:
    # Execute
    shared = tomllib.loads(config_toml("cuda", 4, 1))
    own = tomllib.loads(config_toml("cuda", 2, 2))
    cpu = tomllib.loads(config_toml("cpu", 4, 0))

    # Assert
    assert shared["scheduler"]["max_sp_degree"] == 1
    assert "scheduler" not in own
    assert "max_sp_degree" not in cpu["scheduler"]
