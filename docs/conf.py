"""Sphinx configuration of the documentation site: ``sphinx-build -W -n -b html docs docs/_build/html``.

The content pages include sections of README.md (one text for both); the API pages are generated from the
docstrings by autodoc (Google-style sections through napoleon). ``-W -n``: every warning fails the build,
including a cross-reference to a blockquant name that does not exist.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from blockquant import __version__  # noqa: E402

project = "blockquant"
author = "blockquant contributors"
release = version = __version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True}
autodoc_inherit_docstrings = False  # a wrapper's forward is documented by its class, not by PyG's text

# -n checks every cross-reference. Names from other projects cannot be resolved offline (intersphinx would
# download their inventories), so they are exempt; a broken reference to a blockquant name still fails.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(torch|torch_geometric|triton|numpy|np|typing|collections|contextlib|dataclasses|enum|types|os"
              r"|io|json|weakref|threading|argparse)(\..*)?"),
    # private helpers named in annotations are not part of the documented API
    ("py:.*", r"(blockquant\..*\.)?_\w+"),
    ("py:.*", r"(Tensor|Module|Parameter|dtype|device|Adj|EdgeIndex|SparseTensor|MessagePassing|Data)"),
]

html_theme = "furo"
html_title = f"blockquant {release}"
nitpick_ignore_regex.append(("py:class", r"optional"))  # napoleon's "x (int, optional)"


def _lookup(path):
    """The object at a dotted path (``blockquant.adjacency.as_adjacency``), or None. An attribute wins over a
    submodule of the same name: ``blockquant.tune`` is the function."""
    import importlib

    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            break
    try:
        return importlib.import_module(path)
    except ImportError:
        return None


def _resolve_by_identity(app, env, node, contnode):
    """A docstring names an object as its own module sees it (``QuantConfig`` inside ``blockquant.functional``,
    ``blockquant.adjacency.as_adjacency``); the site documents it once, under its public path
    (``blockquant.QuantConfig``). Resolve such a reference to the documented object that *is* the named one.
    Plain data (ints, strings) is not matched by identity: equal constants are not the same thing."""
    if node.get("refdomain") != "py":
        return None
    from sphinx.util.nodes import make_refnode

    domain = env.get_domain("py")
    target = node["reftarget"].lstrip("~.")
    context = [node.get("py:module"), node.get("py:class") and f"{node.get('py:module')}.{node.get('py:class')}"]
    candidates = [f"{c}.{target}" for c in context if c] + [target]
    short = target.rsplit(".", 1)[-1]
    same_name = {name: entry for name, entry in domain.objects.items()
                 if name.startswith("blockquant") and name.rsplit(".", 1)[-1] == short}
    for path in candidates:
        obj = _lookup(path)
        if obj is None or isinstance(obj, (int, float, str, bool, tuple)):
            continue
        for name, entry in same_name.items():
            if _lookup(name) is obj:
                return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name)
    if same_name and "." not in target and len({id(_lookup(name)) for name in same_name}) == 1:
        # a short name that one documented object has (perhaps documented under several paths)
        name, entry = min(same_name.items(), key=lambda item: len(item[0]))
        return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name)
    return None


def setup(app):
    app.connect("missing-reference", _resolve_by_identity)
