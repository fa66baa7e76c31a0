"""The shape of relay.py: each section's lines (by its banner) and the biggest classes.

python bench/layout.py          # the work tree
python bench/layout.py 112d674  # relay.py at that commit
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    if len(sys.argv) > 1:
        show = ["git", "show", f"{sys.argv[1]}:relay.py"]
        src = subprocess.run(show, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    else:
        src = (ROOT / "relay.py").read_text()
    lines = src.splitlines()
    banners = [
        (i, lines[i + 1][2:].strip())
        for i, line in enumerate(lines[:-1])
        if line.startswith("# ----") and re.match(r"# [A-Z]", lines[i + 1])
    ]
    for n, (start, title) in enumerate(banners):
        end = banners[n + 1][0] if n + 1 < len(banners) else len(lines)
        print(f"{end - start:5}  {title}")
    classes = [n for n in ast.parse(src).body if isinstance(n, ast.ClassDef)]
    biggest = sorted(((c.end_lineno - c.lineno + 1, c.name) for c in classes), reverse=True)[:3]
    print(f"{len(lines)} lines; biggest classes: " + ", ".join(f"{name} {size}" for size, name in biggest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
