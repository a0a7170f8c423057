"""`make lint`: fail on a reference from the code or the docs to a document that is not in the
repository: a relative markdown link whose file is missing, or a document named as documents
are (`README.md`, `docs/design.md`; a lowercase bare name like `task.md` is an example, not a
pointer) that no file here is (a reader of the project must be able to follow every pointer)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
DOCUMENT = re.compile(r"(?<![\w/.-])((?:\.\.?/)?(?:[\w.-]+/)+[\w.-]+\.md|[A-Z][\w.-]*\.md)\b")
URL = re.compile(r"\w+://\S+")
CHECKED = (".py", ".md", ".toml", ".service", ".socket", ".conf", ".yml", ".catalog", "")


def tracked() -> list[Path]:
    listing = ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(listing, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / name for name in listed if (REPO / name).is_file()]


def broken(path: Path, documents: set[str]) -> list[str]:
    text = path.read_text(errors="replace")
    found: list[str] = []
    if path.suffix == ".md":
        found.extend(
            f"{path.relative_to(REPO)}: link to {target}, which is not here"
            for target in LINK.findall(text)
            if "://" not in target and not target.startswith("mailto:") and not (path.parent / target).exists()
        )
    for name in DOCUMENT.findall(URL.sub("", text)):
        relative = (path.parent / name).resolve()
        here = relative.is_file() and REPO in relative.parents
        if not here and name not in documents and Path(name).name not in documents:
            found.append(f"{path.relative_to(REPO)}: refers to {name}, which is not in the repository")
    return found


def main() -> int:
    files = tracked()
    documents = {str(f.relative_to(REPO)) for f in files if f.suffix == ".md"}
    documents |= {f.name for f in files if f.suffix == ".md"}
    problems = [line for f in files if f.suffix in CHECKED and f.name != "links.py" for line in broken(f, documents)]
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
