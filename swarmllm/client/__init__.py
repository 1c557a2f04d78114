"""swarmllm."""
