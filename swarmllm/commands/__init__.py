"""One module per ``swarmllm`` subcommand; each exposes ``add_<name>_command(subparsers)``."""

from swarmllm.commands.api import add_api_command
from swarmllm.commands.chat import add_chat_command
from swarmllm.commands.dht import add_dht_command
from swarmllm.commands.generate import add_generate_command
from swarmllm.commands.keygen import add_keygen_command
from swarmllm.commands.manifest import add_manifest_command
from swarmllm.commands.peer import add_peer_command
from swarmllm.commands.status import add_status_command
from swarmllm.commands.swarm import add_swarm_command

__all__ = [
    "add_api_command",
    "add_chat_command",
    "add_dht_command",
    "add_generate_command",
    "add_keygen_command",
    "add_manifest_command",
    "add_peer_command",
    "add_status_command",
    "add_swarm_command",
]
