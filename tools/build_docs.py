r"""Build the HTML site: vendor MathJax from node_modules, then ``mkdocs build --strict``.

MathJax is served by the site itself (no CDN): ``tex-svg.js`` from the npm
package ``mathjax@3`` (installed by ``npm ci`` from package-lock.json) is
copied to ``docs/javascripts/vendor/`` (git-ignored), where mkdocs.yml's
``extra_javascript`` expects it, so ``mkdocs serve`` works too.

Usage::

    python tools/build_docs.py [--site-dir site]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATHJAX = ROOT / "node_modules" / "mathjax" / "es5" / "tex-svg.js"
VENDORED = ROOT / "docs" / "javascripts" / "vendor" / "tex-svg.js"


def vendor_mathjax() -> Path:
    if not MATHJAX.exists():
        raise SystemExit(f"{MATHJAX.relative_to(ROOT)} is missing: run `npm ci` (make docs does)")
    VENDORED.parent.mkdir(parents=True, exist_ok=True)
    if not VENDORED.exists() or VENDORED.read_bytes() != MATHJAX.read_bytes():
        shutil.copyfile(MATHJAX, VENDORED)
    return VENDORED


def build(site_dir: Path) -> Path:
    """Build the site into ``site_dir``; raise ``CalledProcessError`` (with mkdocs' output) on any warning."""
    vendor_mathjax()
    # Not --quiet: it hides the warnings --strict turns into a failure.
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site_dir)],
        cwd=ROOT, check=True, capture_output=True, text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    return site_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site-dir", type=Path, default=ROOT / "site")
    args = parser.parse_args(argv)
    try:
        build(args.site_dir.resolve())
    except subprocess.CalledProcessError as error:
        sys.stderr.write(error.stdout + error.stderr)
        return error.returncode
    print(f"site built in {args.site_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
