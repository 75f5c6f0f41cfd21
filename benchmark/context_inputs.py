"""Does the actor gain from the simulator model's own context? `te.observe` shows the actor the past 20 steers
and lateral accelerations, but of roll, speed and acceleration only the present and the plan, while the model
reads the past 20 of those too. This script appends them (steps t-20..t-1; rows before the first controller
call, step 20, read as step 20's, since a controller never saw them) and trains with ppo_lateral.py's own
`train()`, every flag as there. The run's evaluations use the same observation; ppo_lateral_eval.py and the
export do not know it, so score its checkpoints through this process (the run's curve).

    python benchmark/context_inputs.py --seed 1 --synthetic-train 5000 --exp-name context \\
        --eval-data-path ~/.cache/tinyphysics/synthetic/heldout-n200-seed12345 --eval-segments 200 \\
        --eval-every 250000 --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx --threads 1 --no-progress
"""

import numpy as np
import tyro
from common import extend_observation

import ppo_lateral as pl
import tinyphysics_env as te

CONTEXT_FIELDS = ("roll_lataccel", "v_ego", "a_ego")


def past_context(sim: te.TinyPhysicsSim, base: np.ndarray) -> np.ndarray:
    """Roll, speed and acceleration of steps t-20..t-1 (20 each, in that order)."""
    rows = np.maximum(np.arange(sim.t - te.OBS_HISTORY, sim.t), te.CONTEXT_LENGTH)
    return np.concatenate([sim.data[f][:, rows] for f in CONTEXT_FIELDS], axis=1)


def install() -> None:
    """The speeds' entries are named so that the normaliser scales them as speeds."""
    extend_observation(tuple((f"past_{f}", te.OBS_HISTORY) for f in CONTEXT_FIELDS), past_context)


if __name__ == "__main__":
    install()
    te.run_cli(lambda: print(pl.train(tyro.cli(pl.Args))))
