"""The documentation site (mkdocs.yml, docs/) builds with no warning in strict mode, and its API
reference documents every public name: ``tvlars.__all__`` and what the integration modules
define. The build needs the ``docs`` extra (``pip install -e ".[docs]"``), which the ``test``
extra does not pull in: without it these tests skip, except in CI, which must install it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tvlars

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 120
INTEGRATIONS = ("tvlars.integrations.timm", "tvlars.integrations.lightning")
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx", "l2m4m")


def missing_docs_packages() -> list[str]:
    missing = []
    for name in DOCS_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


@functools.lru_cache(maxsize=None)
def public_names() -> frozenset[str]:
    """The full path of every public name: ``tvlars.__all__``, and the functions and classes
    that each integration module defines (not those it imports) and does not mark private."""
    names = {f"tvlars.{name}" for name in tvlars.__all__}
    for module_name in INTEGRATIONS:
        module = importlib.import_module(module_name)
        names |= {f"{module_name}.{name}" for name, value in vars(module).items()
                  if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
                  and value.__module__ == module_name}
    return frozenset(names)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    missing = missing_docs_packages()
    if missing:
        reason = f'the docs extra is not installed (pip install -e ".[docs]"): no {", ".join(missing)}'
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the documentation site, and {reason}")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0, not a build warning
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    return out, done


def test_the_site_builds_in_strict_mode(site):
    out, done = site
    warnings = [line for line in done.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert done.returncode == 0 and not warnings, (f"mkdocs build --strict exited {done.returncode}:\n"
                                                   + "\n".join(warnings or done.stderr.splitlines()[-30:]))
    assert (out / "index.html").is_file() and (out / "api" / "optimizers" / "index.html").is_file()


# What a page would fetch from elsewhere when it is opened: a script, a stylesheet or a font (Material
# loads Roboto from Google Fonts unless `font: false`), a preconnect, or a CSS url() or @import.
FETCHED = re.compile(r"""<script[^>]*\ssrc="(?:https?:)?//|<link[^>]*\shref="(?:https?:)?//[^"]*"[^>]*>|"""
                     r"""url\(\s*["']?(?:https?:)?//|@import\s+["'](?:https?:)?//""")


def test_the_site_loads_nothing_from_the_network(site):
    out, done = site
    assert (out / "index.html").is_file(), done.stderr[-4000:]
    fetched = []
    for page in sorted([*out.rglob("*.html"), *out.rglob("*.css")]):
        text = page.read_text(encoding="utf-8", errors="replace")
        fetched += [f"{page.relative_to(out).as_posix()}: {m.group(0)[:120]}" for m in FETCHED.finditer(text)
                    if "<link" not in m.group(0) or re.search(r'rel="(?:stylesheet|preconnect|preload|icon)"', m.group(0))]
    assert not fetched, "the site fetches from the network when a page is opened:\n" + "\n".join(fetched[:20])


def test_the_api_reference_documents_every_public_name(site):
    out, done = site
    assert (out / "api").is_dir(), done.stderr[-4000:]
    # mkdocstrings gives each documented object a heading whose id is its path.
    documented = set()
    for page in (out / "api").rglob("index.html"):
        documented |= set(re.findall(r'\bid="(tvlars\.[\w.]+)"', page.read_text(encoding="utf-8")))
    missing = sorted(public_names() - documented)
    assert not missing, (f"public names with no entry in the API reference: {missing}; add a '::: NAME' line "
                         f"to a page of docs/api/ (and a docstring: names without one are not shown)")


# What text meant for a terminal looks like once Markdown has rendered it: a Sphinx role before its
# code (":class:`X`"), a literal-block marker ("...::") ending a paragraph, and emphasis opened or
# closed inside a word, which is ASCII maths such as wd*w outside backticks. The docstrings are
# Markdown (Google style): `[tvlars.LARS][]` links, ":" before an indented block, maths in
# backticks or $...$.
REST_LEFTOVERS = re.compile(r":(?:class|func|meth|mod|attr|obj|data|exc):<code>|::</p>|\w<(?:em|strong)>|</(?:em|strong)>\w")


def test_the_docstrings_render_as_markdown(site):
    out, done = site
    assert (out / "api").is_dir(), done.stderr[-4000:]
    leftovers = []
    for page in sorted((out / "api").rglob("index.html")):
        html = page.read_text(encoding="utf-8")
        leftovers += [f"{page.parent.relative_to(out).as_posix()}: ...{html[max(m.start() - 60, 0):m.end() + 40]}..."
                      for m in REST_LEFTOVERS.finditer(html)]
    assert not leftovers, ("markup for a terminal in the docstrings shows as text in the API reference "
                           "(write `[tvlars.X][]` for a :class:/:func:/:meth: role, end the line before an "
                           "indented block with ':' not '::', and put maths with '*' in backticks or $...$):\n"
                           + "\n".join(leftovers))


@functools.lru_cache(maxsize=None)
def griffe_module(name: str):
    """The module ``name`` as griffe reads it from the sources for mkdocstrings (no import)."""
    import griffe  # the docs extra's

    return griffe.load(name, search_paths=[str(ROOT / "src"), *sys.path], docstring_parser="google")


def undocumented_arguments(path: str) -> list[str]:
    """The arguments of the public callable ``path`` (a class: its constructor's) that its
    docstring's ``Args:`` section leaves out, read as mkdocstrings reads them (griffe, Google
    style); for a NamedTuple, the fields its ``Attributes:`` section leaves out."""
    module_name, _, name = path.rpartition(".")
    obj = griffe_module(module_name)[name]
    obj = obj.final_target if obj.is_alias else obj
    documents = [obj] + ([obj.members["__init__"]] if obj.is_class and "__init__" in obj.members else [])
    sections = [section for doc in documents if doc.docstring for section in doc.docstring.parse("google")]
    named = {entry.name.lstrip("*") for section in sections if section.kind.value in ("parameters", "attributes")
             for entry in section.value}
    if obj.is_class and not obj.parameters:  # a NamedTuple: its fields
        wanted = [member for member, value in obj.members.items() if value.is_attribute and not member.startswith("_")]
    else:
        wanted = [p.name for p in obj.parameters if p.name not in ("self", "cls")]
    return [f"{path}({argument})" for argument in wanted if argument not in named]


def test_every_argument_is_documented(site):
    missing = [argument for path in sorted(public_names()) for argument in undocumented_arguments(path)]
    assert not missing, ("arguments without an entry in their docstring's Args: section (Attributes: for a "
                         "NamedTuple's fields), so the reference shows their default but not what they do: "
                         + ", ".join(missing))


def test_public_names_cover_the_api_and_the_integrations():
    names = public_names()
    assert {"tvlars.LARS", "tvlars.TVFactorLR", "tvlars.integrations.timm.adapt_as_tvlars",
            "tvlars.integrations.lightning.FollowOptimizerSteps"} <= names
    assert not any(name.startswith("tvlars.integrations.timm.OptimInfo") for name in names)  # imported, not defined
