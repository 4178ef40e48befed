"""The documentation stands alone and stays true: the site builds strictly (a broken link,
anchor or API reference fails), no README or page links outside the repository, every
setting of cluster.toml is documented, and ``pip install '.[bench]'`` installs what
``bench/`` imports.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - older Pythons only
    import tomli as tomllib


def build_site(root: pathlib.Path, out: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("KVSTORE_CLUSTER", None)
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(root / "mkdocs.yml"), "-d", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=root, env=env)


def test_the_site_builds_strictly(tmp_path):
    result = build_site(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    # The README is a page of the site, with the images it shows.
    assert (site / "readme" / "index.html").is_file()
    assert (site / "repo" / "bench" / "results" / "cluster.png").is_file()
    # The CLI reference is every subcommand's --help, from the parser itself.
    from kvstore.cli import build_parser
    reference = (site / "cli" / "index.html").read_text()
    for action in build_parser()._actions:
        for name in getattr(action, "choices", None) or ():
            assert f'id="kvstore-{name}"' in reference, name
    # The API reference is generated from the docstrings.
    api = (site / "api" / "index.html").read_text()
    assert 'id="kvstore.api.KV.run_transaction"' in api
    # Nothing the site shows (docstrings included) sends a reader to the team's files.
    assert not [p for p in site.rglob("*.html") if "shared/API.md" in p.read_text()]


def _copy_of_the_docs(tmp_path: pathlib.Path) -> pathlib.Path:
    """The repository seen through symlinks, with docs/ (and mkdocs.yml, which mkdocs
    reads docs/ relative to once it resolved its link) real copies to break."""
    import shutil
    root = tmp_path / "repo"
    root.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("docs", "mkdocs.yml", ".git"):
            (root / entry.name).symlink_to(entry)
    shutil.copytree(ROOT / "docs", root / "docs")
    shutil.copy(ROOT / "mkdocs.yml", root / "mkdocs.yml")
    return root


@pytest.mark.parametrize("broken, named", [
    ("[a lost heading](../README.md#no-such-heading) and [a lost page](no-such-page.md)",
     ["no-such-heading", "no-such-page.md"]),
    ("[a team file](../../shared/API.md)", ["outside the repository"]),
])
def test_a_broken_link_fails_the_build(tmp_path, broken, named):
    root = _copy_of_the_docs(tmp_path)
    with open(root / "docs" / "testing.md", "a") as f:
        f.write(f"\nSee {broken}.\n")
    result = build_site(root, tmp_path / "site")
    assert result.returncode != 0
    for name in named:
        assert name in result.stdout + result.stderr


def test_a_missing_api_reference_fails_the_build(tmp_path):
    root = _copy_of_the_docs(tmp_path)
    with open(root / "docs" / "api.md", "a") as f:
        f.write("\n::: kvstore.api.NoSuchClass\n")
    result = build_site(root, tmp_path / "site")
    assert result.returncode != 0
    assert "NoSuchClass" in result.stdout + result.stderr


#: The Markdown a clone carries: READMEs and docs.
def markdown_files() -> list:
    files = [ROOT / "README.md", ROOT / "deploy" / "README.md"]
    return files + sorted((ROOT / "docs").rglob("*.md"))


LINK = re.compile(r"\]\(([^)\s]+)")


def test_no_readme_or_page_links_outside_the_repository():
    """A clone has no ../shared (the team's files): every relative link must land on a
    file of the repository."""
    bad = []
    for path in markdown_files():
        text = path.read_text()
        if "../shared" in text or "shared/API.md" in text:
            bad.append(f"{path.relative_to(ROOT)} mentions ../shared")
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:|^#", target):
                continue  # a URL or an anchor on the same page
            resolved = (path.parent / target.split("#")[0]).resolve()
            if ROOT not in resolved.parents or not resolved.exists():
                bad.append(f"{path.relative_to(ROOT)} links to {target}")
    assert not bad, "\n".join(bad)


def test_every_setting_of_cluster_toml_is_documented():
    """Every key the config reader accepts (the key sets of kvstore/node/config.py and its
    [tuning] table) appears, as code, in docs/configuration.md."""
    from kvstore.node.config import TUNING
    source = (ROOT / "kvstore" / "node" / "config.py").read_text()
    keys = set(TUNING)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Set):
            keys |= {e.value for e in node.elts if isinstance(e, ast.Constant)}
    assert {"shards", "address", "peer_address", "data", "curve", "keys", "tick_ms"} <= keys
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(k for k in keys if f"`{k}`" not in page and f"[{k}" not in page)
    assert not missing, f"docs/configuration.md does not document {missing}"


def _distribution_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


#: The distribution that provides each third-party module bench/ imports.
DISTRIBUTION_OF = {"lmdb": "lmdb", "zmq": "pyzmq", "msgpack": "msgpack", "xxhash": "xxhash",
                   "matplotlib": "matplotlib", "plyvel": "plyvel", "rocksdict": "rocksdict",
                   "pysyncobj": "pysyncobj", "pytest": "pytest", "grpc": "grpcio"}


def _is_standard_library(module: str) -> bool:
    names = getattr(sys, "stdlib_module_names", None)  # Python 3.10 on
    if names is not None:
        return module in names
    if module in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    if spec.origin == "frozen":
        return True
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    origin = os.path.realpath(spec.origin)
    return origin.startswith(stdlib + os.sep) and "site-packages" not in origin


def test_the_bench_extra_installs_what_bench_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    provided = {_distribution_name(r) for r in project["dependencies"]}
    provided |= {_distribution_name(r) for r in project["optional-dependencies"]["bench"]}
    local = {p.stem for p in (ROOT / "bench").glob("*.py")}
    missing = set()
    for path in (ROOT / "bench").glob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top == "kvstore" or top in local or _is_standard_library(top):
                    continue
                dist = DISTRIBUTION_OF.get(top)
                if dist is None or dist not in provided:
                    missing.add(f"{top} (bench/{path.name})")
        if re.search(r"def test_\w+\([^)]*\bbenchmark\b", text) and \
                "pytest-benchmark" not in provided:
            missing.add(f"pytest-benchmark (the benchmark fixture of bench/{path.name})")
    assert not missing, f"add to pyproject.toml's bench extra: {sorted(missing)}"
