"""GRPO as pure tensor functions: advantages, losses, filters, logprobs (no Ray, no vLLM)."""
