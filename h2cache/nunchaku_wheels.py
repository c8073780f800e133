"""Which of nunchaku's CUDA wheels fits an environment, decided from versions alone (no network, no import).

nunchaku is not on PyPI (the PyPI package of that name is an unrelated project): its wheels are GitHub release
assets named ``nunchaku-<version>+torch<X.Y>-cp<PY>-cp<PY>-<platform>.whl``. The wheel does not declare torch as a
dependency, so pip would install a wheel built for another torch, and ``import nunchaku`` then fails on the ABI.
The matrix below is the one nunchaku's release workflow (``.github/workflows/release-build.yaml``) builds at
``RELEASE``.
"""

from __future__ import annotations

from dataclasses import dataclass

RELEASE = "1.1.0"
RELEASES_URL = "https://github.com/nunchaku-tech/nunchaku/releases"
PYTHON_VERSIONS = ("3.10", "3.11", "3.12", "3.13")
# torch versions with a wheel, per platform tag (Windows builds only the newest torch).
TORCH_VERSIONS = {"linux_x86_64": ("2.7", "2.8", "2.9"), "win_amd64": ("2.9",)}
ALL_TORCH_VERSIONS = TORCH_VERSIONS["linux_x86_64"]


class NoWheel(ValueError):
    """No nunchaku wheel fits this environment; the message says what would."""


@dataclass(frozen=True)
class Environment:
    torch_version: str  # torch.__version__, e.g. "2.9.1+cu130"
    python_version: str  # "3.11"
    platform: str  # sys.platform, e.g. "linux" or "win32"
    machine: str  # platform.machine(), e.g. "x86_64" or "AMD64"


def major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def platform_tag(environment: Environment) -> str:
    machine = environment.machine.lower()
    if environment.platform.startswith("linux") and machine in ("x86_64", "amd64"):
        return "linux_x86_64"
    if environment.platform == "win32" and machine in ("x86_64", "amd64"):
        return "win_amd64"
    raise NoWheel(
        f"nunchaku publishes wheels for Linux x86_64 and Windows x86_64 only, not {environment.platform} "
        f"{environment.machine}: build it from source (CUDA >= 12.2, see {RELEASES_URL.rsplit('/', 1)[0]})"
    )


def wheel_url(environment: Environment, release: str = RELEASE) -> str:
    """The release asset for ``environment``; raises ``NoWheel`` naming the supported torch / Python versions."""
    tag = platform_tag(environment)
    if environment.python_version not in PYTHON_VERSIONS:
        raise NoWheel(
            f"nunchaku {release} has wheels for Python {', '.join(PYTHON_VERSIONS)}, not {environment.python_version}: "
            "use one of those in a new virtual environment"
        )
    torch = major_minor(environment.torch_version)
    if torch not in TORCH_VERSIONS[tag]:
        supported = TORCH_VERSIONS[tag]
        raise NoWheel(
            f"nunchaku {release} has no {tag} wheel for torch {torch} (only for torch {', '.join(supported)}): in a "
            f"new virtual environment, pip install 'torch=={supported[-1]}.*' torchvision first, then rerun this"
        )
    python = "cp" + environment.python_version.replace(".", "")
    return f"{RELEASES_URL}/download/v{release}/nunchaku-{release}+torch{torch}-{python}-{python}-{tag}.whl"
