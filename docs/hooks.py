"""mkdocs hooks: the repository files the docs link to, brought into the site.

The pages link to the rest of the repository as a clone or GitHub shows it
(``../README.md#cluster``, ``../deploy/cluster.example.toml``), so one Markdown file reads
right everywhere. Those targets lie outside ``docs/``, where mkdocs looks for nothing;
these hooks add each one to the site (``README.md`` as the page ``readme.md``, any other
file as a copy under ``repo/``), follow the links of the Markdown files they add, and
rewrite every such link to its copy. So ``mkdocs build --strict`` still checks every link
and every anchor, and a link that leaves the repository fails the build.

They also write the command-line reference where a page says ``<!-- kvstore help -->``:
the ``--help`` of ``kvstore`` and of each of its subcommands, from the parser itself, so
the reference lists every subcommand and option there is, in the words of its help.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import sys

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

#: Where copies of repository files (outside docs/) go in the site.
REPO_PREFIX = "repo/"
#: The site's name for the repository's README (``README.md`` would become an index page).
README_PAGE = "readme.md"

_INLINE_LINK = re.compile(r"(\]\()([^)\s]+)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _root(config) -> str:
    return os.path.dirname(os.path.abspath(config["config_file_path"]))


def _repo_path(src_uri: str) -> str:
    """A site file's path in the repository."""
    if src_uri == README_PAGE:
        return "README.md"
    if src_uri.startswith(REPO_PREFIX):
        return src_uri[len(REPO_PREFIX):]
    return "docs/" + src_uri


def _site_path(repo_path: str) -> str:
    """A repository file's path in the site."""
    if repo_path == "README.md":
        return README_PAGE
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/"):]
    return REPO_PREFIX + repo_path


def _outside_fences(markdown: str):
    """``(line, in_code)`` for each line, so links in fenced code are left alone."""
    fence = None
    for line in markdown.splitlines(keepends=True):
        match = _FENCE.match(line)
        if match and (fence is None or match.group(1) == fence):
            fence = None if fence else match.group(1)
            yield line, True
        else:
            yield line, fence is not None


def _resolve(target: str, page_repo_path: str) -> tuple | None:
    """``(repository path, fragment)`` of a relative link, None for an external or
    same-page one; PluginError for one that leaves the repository."""
    if not target or target.startswith("#") or _EXTERNAL.match(target) or target.startswith("/"):
        return None
    path, _, fragment = target.partition("#")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo_path), path))
    if resolved == ".." or resolved.startswith("../"):
        raise PluginError(f"{page_repo_path} links to {target}, outside the repository: a "
                          f"clone does not have it; link to a page of docs/ instead")
    return resolved, fragment


def _links(markdown: str, page_repo_path: str):
    for line, in_code in _outside_fences(markdown):
        if not in_code:
            for match in _INLINE_LINK.finditer(line):
                resolved = _resolve(match.group(2), page_repo_path)
                if resolved is not None:
                    yield resolved[0]


def on_files(files, config):
    """Add README.md and every repository file a page links to (transitively)."""
    root = _root(config)
    queue = [f.src_uri for f in files if f.src_uri.endswith(".md")]
    seen = set(queue)
    while queue:
        repo_path = _repo_path(queue.pop())
        try:
            with open(os.path.join(root, repo_path), encoding="utf-8") as f:
                markdown = f.read()
        except OSError:
            continue
        for target in _links(markdown, repo_path):
            if target.startswith("docs/") or not os.path.isfile(os.path.join(root, target)):
                continue  # a page mkdocs knows, or a missing file mkdocs will report
            site = _site_path(target)
            if site in seen:
                continue
            seen.add(site)
            files.append(File.generated(config, site, abs_src_path=os.path.join(root, target)))
            if site.endswith(".md"):
                queue.append(site)
    return files


#: Where a page wants the CLI reference.
CLI_HELP_MARKER = "<!-- kvstore help -->"
#: The width the help is wrapped at (argparse reads $COLUMNS).
HELP_COLUMNS = "88"


def cli_reference(root: str) -> str:
    """``kvstore --help`` and each subcommand's, as Markdown: a heading and a text block each."""
    if root not in sys.path:
        sys.path.insert(0, root)
    from kvstore.cli import build_parser
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        parser = build_parser()
        parts = [f"### kvstore\n\n```text\n{parser.format_help()}```\n"]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    parts.append(f"### kvstore {name}\n\n```text\n{sub.format_help()}```\n")
        return "\n".join(parts)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def on_page_markdown(markdown, page, config, files):
    """Point each link to a repository file at its copy in the site; write the CLI
    reference where a page asks for it."""
    if CLI_HELP_MARKER in markdown:
        markdown = markdown.replace(CLI_HELP_MARKER, cli_reference(_root(config)))
    page_repo_path = _repo_path(page.file.src_uri)
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match):
        resolved = _resolve(match.group(2), page_repo_path)
        if resolved is None:
            return match.group(0)
        repo_path, fragment = resolved
        link = posixpath.relpath(_site_path(repo_path), page_dir or ".")
        return match.group(1) + link + ("#" + fragment if fragment else "")

    return "".join(line if in_code else _INLINE_LINK.sub(rewrite, line)
                   for line, in_code in _outside_fences(markdown))
