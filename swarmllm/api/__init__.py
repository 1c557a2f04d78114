"""``swarmllm api``: an OpenAI-compatible HTTP server, a web chat and a swarm dashboard."""
