"""Does the actor gain from curvature inputs? Lateral acceleration is speed squared times curvature, so a
steer that follows the road's curvature relates to lateral acceleration through 1 / v^2, a product the
actor's small MLP would have to build from its speed and acceleration inputs. The best pure-PPO entry of
the challenge fed it (lataccel - roll) / max(v^2, 1) directly. This script appends that quantity, computed
from what the observation holds (so an exported controller could compute it too), for the current lateral
acceleration, the target and the 49 planned rows, and trains with ppo_lateral.py's own `train()`, every flag
as there. Score its checkpoints through its own evaluations (the run's curve), as for context_inputs.py.

    python benchmark/curvature_inputs.py --seed 1 --synthetic-train 5000 --exp-name curvature \\
        --eval-data-path ~/.cache/tinyphysics/synthetic/heldout-n200-seed12345 --eval-segments 200 \\
        --eval-every 250000 --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx --threads 1 --no-progress
"""

import numpy as np
import tyro
from common import extend_observation

import ppo_lateral as pl
import tinyphysics_env as te

BASE = te.obs_slices()
CURVATURE_SCALE = 100.0  # in 1 / (100 m): a 100 m radius reads 1
CURVATURE_CLIP = 5.0  # near standstill max(v^2, 1) is small and the quotient meaningless: keep it bounded


def curvature(lataccel: np.ndarray, roll: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.clip((lataccel - roll) / np.maximum(v * v, 1.0) * CURVATURE_SCALE, -CURVATURE_CLIP, CURVATURE_CLIP)


def curvature_features(sim: te.TinyPhysicsSim, base: np.ndarray) -> np.ndarray:
    """The current and the target lateral acceleration's curvature at step t (under its roll and speed), then
    the plan's 49 rows' (each under its own row's roll and speed)."""
    roll, v = base[:, BASE["roll_lataccel"]], base[:, BASE["v_ego"]]
    now = np.concatenate([base[:, BASE["current_lataccel"]], base[:, BASE["target_lataccel"]]], axis=1)
    future = curvature(base[:, BASE["future_lataccel"]], base[:, BASE["future_roll_lataccel"]],
                       base[:, BASE["future_v_ego"]])
    return np.concatenate([curvature(now, roll, v), future], axis=1)


def install() -> None:
    extend_observation((("curvature_now", 2), ("future_curvature", te.FUTURE_LEN)), curvature_features)


if __name__ == "__main__":
    install()
    te.run_cli(lambda: print(pl.train(tyro.cli(pl.Args))))
