"""The README's Python examples, so that tests run them as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(containing: str) -> list[str]:
    """The README's ```python blocks that contain ``containing`` (a placeholder to fill in)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [code for code in blocks if containing in code]
