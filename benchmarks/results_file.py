"""How every benchmark writes its JSON: the command that made it, then its results."""

import json
import os
import sys


def write_json(path, result):
    """Writes `{"command": this process's command line, **result}` to `path` and says so."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"command": "python " + " ".join(sys.argv), **result}, f, indent=2)
    print(f"\nwrote {path}")
