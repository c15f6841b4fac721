"""``python -m air_reg.speed [build]``: whether air-reg's CPU kernels run here; build them."""

from __future__ import annotations

import json
import logging
import sys

from air_reg.speed import kernels, report


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv not in ([], ["build"]):
        print("usage: python -m air_reg.speed [build]", file=sys.stderr)
        return 2
    if argv == ["build"]:
        try:
            path = kernels.library()._name
        except kernels.KernelUnavailable as err:
            print(f"air-reg's CPU kernels cannot be built here: {err}", file=sys.stderr)
            return 1
        print(f"built {path}")
        return 0
    print(json.dumps(report({"attention": "auto", "dropout": "fast"}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
