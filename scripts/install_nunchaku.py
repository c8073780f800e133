"""Install nunchaku's CUDA wheel for the torch and Python of this environment: ``python scripts/install_nunchaku.py``.

Never ``pip install nunchaku``: that PyPI name is an unrelated project. This picks the matching GitHub release asset
(h2cache.nunchaku_wheels), refuses when none matches (nunchaku's wheels do not pin torch, so a mismatched one would
install and then fail on import), and runs pip on it. ``--print`` only prints the URL.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from h2cache.nunchaku_wheels import RELEASE, Environment, NoWheel, wheel_url  # noqa: E402


def current_environment() -> Environment:
    import torch

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Environment(torch.__version__, python, sys.platform, platform.machine())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--print", dest="print_only", action="store_true", help="print the wheel's URL, install nothing"
    )
    parser.add_argument("--release", default=RELEASE, help="nunchaku release (default: %(default)s)")
    args = parser.parse_args(argv)

    from h2cache.models import nunchaku_status

    if nunchaku_status() == "unrelated":
        print(
            "install_nunchaku: error: the unrelated PyPI 'nunchaku' is installed: pip uninstall nunchaku",
            file=sys.stderr,
        )
        return 1
    try:
        url = wheel_url(current_environment(), args.release)
    except NoWheel as error:
        print(f"install_nunchaku: error: {error}", file=sys.stderr)
        return 1
    if args.print_only:
        print(url)
        return 0
    return subprocess.call([sys.executable, "-m", "pip", "install", url])


if __name__ == "__main__":
    raise SystemExit(main())
