"""Files shipped with swarmllm: the embedded model's vision pair and example pictures."""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).parent / "examples"


def example_images() -> list[str]:
    """The names of the shipped example pictures."""
    return sorted(path.name for path in EXAMPLES_DIR.glob("*.png"))


def example_image(name: str) -> Path | None:
    """The shipped example picture called ``name`` (with or without ``.png``), or None."""
    for candidate in (name, f"{name}.png"):
        path = EXAMPLES_DIR / candidate
        if "/" not in name and path.is_file():
            return path
    return None
