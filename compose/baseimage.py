"""Make sure the base image every image here is built FROM exists (standard library only).

    python compose/baseimage.py ensure [--image debian:trixie-slim] [--dry-run]

`make up` runs this before building. In order:

1. the image is present locally: nothing to do;
2. else `docker pull` it, with docker's own progress (what compose would do by itself);
3. else (no registry reachable: an offline machine, this project's build machines) build it
   locally with debootstrap: compose/base-image.sh, which needs root. Not root: say exactly
   what to run instead.

It always says which of the three happened. `decide()` is the whole decision, without I/O, so
the tests can check every branch and its message; `--dry-run` does the real checks and the
real pull but only says what it would build.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = "compose/base-image.sh"
DEFAULT_IMAGE = "debian:trixie-slim"


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str   # "use" (present), "pulled", "build" (debootstrap), "fail"
    message: str


def decide(image: str, present: bool, pull_error: str | None, is_root: bool) -> Decision:
    """What to do, given whether `image` is present, how the pull went (None: it succeeded;
    only looked at when not present) and whether we may run debootstrap."""
    if present:
        return Decision("use", f"base image {image}: present locally")
    if pull_error is None:
        return Decision("pulled", f"base image {image}: pulled from the registry")
    reason = pull_error.strip().splitlines()[-1] if pull_error.strip() else "no reason given"
    if is_root:
        return Decision("build", f"base image {image}: the pull failed ({reason}); building it "
                                 f"locally with debootstrap instead ({BUILD_SCRIPT}, a minute or two)")
    return Decision("fail", f"error: base image {image} could not be pulled ({reason}), and building "
                            f"it locally with debootstrap needs root. Run `sudo bash {BUILD_SCRIPT} "
                            f"--tag {image}`, then `make up` again.")


def present(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


def pull(image: str) -> str | None:
    """docker pull, its progress on our terminal; None on success, else its error output."""
    print(f"==> base image {image} is not present; pulling it", flush=True)
    proc = subprocess.run(["docker", "pull", image], stderr=subprocess.PIPE, text=True)
    if proc.returncode == 0:
        return None
    return proc.stderr or f"docker pull exited {proc.returncode}"


def ensure(image: str, dry_run: bool = False) -> int:
    is_present = present(image)
    pull_error = None if is_present else pull(image)
    decision = decide(image, is_present, pull_error, os.geteuid() == 0)
    print(decision.message, file=sys.stderr if decision.action == "fail" else sys.stdout, flush=True)
    if decision.action != "build":
        return 1 if decision.action == "fail" else 0
    command = ["bash", str(ROOT / BUILD_SCRIPT), "--tag", image]
    if dry_run:
        print(f"dry run: would run {' '.join(command)}")
        return 0
    if subprocess.run(command).returncode != 0:
        print(f"error: building {image} with debootstrap failed (see above)", file=sys.stderr)
        return 1
    print(f"base image {image}: built locally with debootstrap", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="baseimage.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("ensure", help="use, pull or build the base image; say which")
    e.add_argument("--image", default=DEFAULT_IMAGE)
    e.add_argument("--dry-run", action="store_true", help="check and pull for real, build nothing")
    args = parser.parse_args(argv)
    return ensure(args.image, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
