"""User-style reward functions loaded by file path in the pool tests (`tests/rewards/user_rewards.py:<fn>`)."""
import os
import time
import warnings

from sse_rl.rewards import RewardTimeoutWarning, RewardWarning


class OddSampleWarning(RewardWarning):
    pass


def brevity(prompts, completions, **columns):
    return [1.0 / (1 + len(c)) for c in completions]


def worker_pid(prompts, completions, **columns):
    """The grading process's id after a short nap, so a test sees which workers served a batch."""
    time.sleep(0.2)
    return [float(os.getpid()) for _ in completions]


def nap(prompts, completions, **columns):
    """Returns after 2 s: longer than a short probe limit."""
    time.sleep(2)
    return [1.0 for _ in completions]


def misbehave(prompts, completions, **columns):
    """Acts out what the completion asks for: sleep, hog memory, raise, warn, time out itself, or return junk."""
    out = []
    for c in completions:
        if c == "sleep":
            time.sleep(60)
        elif c == "hog":
            bytearray(8 << 30)
        elif c == "raise":
            raise KeyError("no column 'difficulty'")
        elif c == "alarm":
            warnings.warn(RewardTimeoutWarning("own time limit hit"), stacklevel=1)
            out.append(0.0)
            continue
        elif c == "warn":
            warnings.warn(OddSampleWarning("sample looks odd"), stacklevel=1)
        elif c == "junk":
            return ["1.0"]
        elif c == "nan":
            out.append(float("nan"))
            continue
        out.append(1.0)
    return out
