"""A reward file loaded by path (the plug-in API's "path/to/file.py:fn" form) that hangs or kills its process."""
import os
import time


def misbehaving_reward(prompts, completions, **columns):
    """1.0 normally; "hang" sleeps far past any timeout; "die" kills the grading process."""
    out = []
    for completion in completions:
        if completion == "hang":
            time.sleep(3600)
        if completion == "die":
            os._exit(3)
        out.append(1.0)
    return out
