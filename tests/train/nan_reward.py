"""A secondary reward loaded by path that returns NaN for some completions (a bug the run must stop on)."""


def nan_reward(prompts, completions, **columns):
    """NaN for the completion "7", else 0.0."""
    return [float("nan") if completion == "7" else 0.0 for completion in completions]
