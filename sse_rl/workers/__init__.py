"""Ray actors, each owning one resource: rollout (a vLLM engine), reward (a grading pool), trainer (a rank)."""
