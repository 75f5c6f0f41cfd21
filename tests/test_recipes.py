import dataclasses
import shlex

import pytest
import tyro

import ppo_lateral as pl


@pytest.fixture(scope="module")
def recipes(benchmark_script):
    return benchmark_script("recipes")


@pytest.mark.parametrize("changes", [
    {},
    {"gamma": 0.95, "late_gamma": (0.97, 0.98), "late_gamma_from": (2_000_000, 4_000_000), "antithetic_noise": False,
     "common_noise": False, "noise_correlation": 0.5, "total_timesteps": 4_000_000, "curvature_inputs": False},
    {"late_gamma": (), "late_gamma_from": (), "init_logstd": -4.5},
])
def test_an_adopted_runs_flags_give_back_its_recipe(recipes, changes):
    """A record's flags, given to the training script, rebuild the run's arguments (except those that only
    place the run: its seed, data and folders)."""
    args = pl.Args(seed=7, exp_name="placed", **changes)
    flags = recipes.recipe_flags({"version": pl.CHECKPOINT_VERSION, "args": dataclasses.asdict(args)})
    assert ("--seed" in flags, "--exp-name" in flags) == (False, False)
    rebuilt = tyro.cli(pl.Args, args=shlex.split(flags))
    assert dataclasses.replace(rebuilt, seed=7, exp_name="placed") == args
    assert all(f"--{k.replace('_', '-')}" in flags for k in changes if not isinstance(changes[k], bool))


def test_a_records_flags_hold_no_path_of_the_machine_that_made_it(recipes):
    """Resuming, extending and the thread count place a run; they are no part of its recipe, and a resumed run's
    flags must not carry the checkpoint's absolute path into the committed records."""
    args = pl.Args(resume="/somewhere/runs/r/checkpoints/checkpoint_998400.pt", extend_to=4_000_000, threads=1,
                   total_timesteps=4_000_000)
    assert recipes.recipe_flags({"version": pl.CHECKPOINT_VERSION, "args": dataclasses.asdict(args)}) == \
        "--total-timesteps 4000000"
