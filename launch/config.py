"""Print the resolved config: `python -m launch.config CONFIG [key=value ...]`.

A config is the schema's defaults, then a YAML file from configs/, then `key=value` overrides
(training/config.py); a wrong key, type or value is one line naming it (exit 2).
"""

from __future__ import annotations

import sys

from training.config import ConfigError, load_config, to_yaml


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        print(to_yaml(load_config(argv[0], argv[1:])), end="")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
