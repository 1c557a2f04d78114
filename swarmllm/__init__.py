"""swarmllm: run large language models across a peer-to-peer swarm."""

import os

# Idle torch (OpenMP) threads sleep instead of spinning. Peers and clients share machines, and
# a process's spinning threads take the cores the others compute on: with the client spinning,
# a 3-peer swarm on 2 cores took 20% longer for a prompt. libgomp reads this when torch loads,
# so it only helps when swarmllm is imported first (the swarmllm command always is).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
