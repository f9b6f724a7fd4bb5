"""``python -m homespec.native``: build the native decode glue now and say where it is (install.sh runs this)."""

from __future__ import annotations

import sys

from homespec.native import build


def main() -> int:
    try:
        path = build()
    except RuntimeError as e:
        print(f"[native] not built: {e} (quantized stages will run torch operators)")
        return 0  # not an install failure: the stages fall back
    print(f"[native] decode glue: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
