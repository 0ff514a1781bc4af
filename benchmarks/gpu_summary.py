"""Print the short Markdown table of the JSON files the gpu_*.py scripts wrote to a folder.

Usage: ``python benchmarks/gpu_summary.py OUT_DIR`` (the rendering lives in
:mod:`report`, shared with ``elogitnorm-fast bench``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from report import gpu_tables

if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    print("\n".join(gpu_tables(folder)) or f"no GPU JSON in {folder}")
