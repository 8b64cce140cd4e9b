"""What a run must not train through: non-finite values, and steps that stop training anything.

Choices:
1) Every quantity a step produces is checked where it is made, and stops the run with `NonFiniteError` naming it:
   rewards (per reward function and sample, `sse_rl.rollouts.to_groups`), advantages (`sse_rl.rollouts.batches`),
   the weights after the update (counted on the trainer's device, read with the step's statistics) and the weight
   sync's probe. The controller adds the step and the checkpoint to resume from (`RunStopped`).
2) A non-finite loss or gradient skips that update (the weights stay as they were), so one bad batch costs a step;
   `train.max_skipped_steps` such steps in a row mean the run cannot recover, and it stops.
3) A step without a group whose rewards vary has all-zero advantages: it trains nothing. It is logged as a warning,
   and `train.max_empty_steps` of them in a row stop the run (a reward that never varies, a task too hard).
"""
from __future__ import annotations


class NonFiniteError(RuntimeError):
    """A value the run must not train on; the message names the quantity and where it came from."""


class RunStopped(RuntimeError):
    """The run stops on a fault (the message names the step, the quantity and the checkpoint to resume from)."""


class StreakLimit:
    """Consecutive steps with one kind of fault (a skipped update, an empty step), against their limit."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def record(self, faulty: bool) -> bool:
        """Count this step (a fault-free step resets the streak); True when `limit` faulty steps are in a row."""
        self.count = self.count + 1 if faulty else 0
        return self.count >= self.limit
