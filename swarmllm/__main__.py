"""``python -m swarmllm`` runs the ``swarmllm`` command."""

import sys

from swarmllm.cli import main

sys.exit(main())
