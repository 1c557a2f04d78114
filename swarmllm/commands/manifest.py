"""``swarmllm manifest MODEL``: write the manifest that gives a partial copy its model id.

A directory holding only some shards of a model cannot hash the others; the manifest
(``swarmllm-manifest.json``: every weight file's sha256 and size, and which file holds each
tensor) lets it compute the same id as a complete copy and verify the shards it has.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_manifest_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "manifest", help="write the manifest of a model's weights (for partial copies)"
    )
    parser.add_argument(
        "model", help="a directory holding every weight file, or a hub id (reads metadata only)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="file or directory to write it to (default: into the model directory)",
    )
    parser.set_defaults(handler=manifest)


def manifest(args: argparse.Namespace) -> None:
    from swarmllm.blocks.manifest import MANIFEST_FILE, write_manifest
    from swarmllm.blocks.sources import ModelSourceError, directory_manifest, resolve_model

    directory = Path(args.model).expanduser()
    if directory.is_dir():  # from the files themselves, never from an older manifest
        written = directory_manifest(directory)
    elif args.output is None:
        raise ModelSourceError("a hub model's manifest needs --output FILE_OR_DIRECTORY")
    else:
        written = resolve_model(args.model).weight_files().manifest
    target = args.output or directory
    if target.is_dir():
        target = target / MANIFEST_FILE
    write_manifest(written, target)
    model_id = resolve_model(directory if directory.is_dir() else args.model).model_id
    print(f"wrote {target}: the sha256 of {len(written.files)} weight files of model {model_id}")
