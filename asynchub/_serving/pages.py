"""The pages people browse: what a module shows (signatures, size, its ``README.md`` as a
model card) and the HTML of the index and of each module's page.

Plain functions: :func:`describe` reads a module (blocking: the app runs it in a thread),
the page functions only format. Every value shown is escaped; a README is rendered with
markdown-it-py with raw HTML off, so it cannot inject markup or script. Pages work without
JavaScript and fit a phone's width.
"""

from __future__ import annotations

import html
import importlib
import json
import logging
import math
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .._pack import MODULE_MARKERS
from ..errors import MissingDependencyError
from .datatypes import DATATYPES
from .repository import ModuleSource

__all__ = ["DATATYPES", "Description", "Signature", "Tensor", "describe", "index", "module"]

logger = logging.getLogger("asynchub.server")

# The numpy type a tritonclient snippet builds for each datatype (BF16 goes as float32).
_NUMPY = {
    "BOOL": "bool",
    "FP16": "np.float16",
    "BF16": "np.float32",
    "FP32": "np.float32",
    "FP64": "np.float64",
    "BYTES": "object",
}
# saved_model.pb read from a prebuilt archive, at most this big.
_MAX_GRAPH_BYTES = 256 << 20
# A model card longer than this is cut (it is a page, not a book).
_MAX_README_BYTES = 256 << 10
_README = "README.md"
# Placeholder values a curl snippet spells out; bigger inputs are written by a script.
_MAX_LITERAL_VALUES = 64
_DEFAULT_SIGNATURES = ("default", "serving_default")
_PY_ZERO = {"BOOL": "False", "BYTES": "''"}


@dataclass(frozen=True)
class Tensor:
    key: str
    dtype: str  # TensorFlow's name: float32, string, ...
    dims: tuple[int, ...] | None  # -1 for any size; None for an unknown rank

    @property
    def shape(self) -> str:
        """As Python prints a TensorShape's dims: ``(None, 3)``."""
        if self.dims is None:
            return "unknown rank"
        text = ["None" if d < 0 else str(d) for d in self.dims]
        return f"({text[0]},)" if len(text) == 1 else f"({', '.join(text)})"

    @property
    def datatype(self) -> str:
        return DATATYPES.get(self.dtype, self.dtype.upper())

    @property
    def example_shape(self) -> list[int]:
        """A shape one request may have: any size is 1, an unknown rank one value."""
        return [1] if self.dims is None else [1 if d < 0 else d for d in self.dims]


@dataclass(frozen=True)
class Signature:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


@dataclass(frozen=True)
class Description:
    size: str
    signatures: tuple[Signature, ...]
    note: str | None  # why no signatures are shown
    readme: str | None = None  # the module's README.md, the model card


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({size} bytes)"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# -- reading a module ---------------------------------------------------------------------------


def _describe_graph(data: bytes, *, text: bool) -> tuple[Signature, ...]:
    """The signatures of a serialized SavedModel, parsed without loading the graph."""
    from .._tf import import_tensorflow

    tf = import_tensorflow()
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    if text:
        # protobuf ships no type stubs; imported by name to keep it an Any.
        text_format = importlib.import_module("google.protobuf.text_format")
        text_format.Parse(data.decode("utf-8"), saved_model)
    else:
        saved_model.ParseFromString(data)
    graphs = list(saved_model.meta_graphs)
    if not graphs:
        return ()
    meta = next((g for g in graphs if "serve" in g.meta_info_def.tags), graphs[0])

    def dtype_name(value: int) -> str:
        try:
            return str(tf.dtypes.as_dtype(value).name)
        except (TypeError, ValueError):
            return f"dtype {value}"

    def dims(shape: Any) -> tuple[int, ...] | None:
        return None if shape.unknown_rank else tuple(int(d.size) for d in shape.dim)

    def tensors(infos: Any) -> tuple[Tensor, ...]:
        return tuple(
            Tensor(key, dtype_name(infos[key].dtype), dims(infos[key].tensor_shape))
            for key in sorted(infos)
        )

    return tuple(
        Signature(name, tensors(sig.inputs), tensors(sig.outputs))
        for name, sig in sorted(meta.signature_def.items())
        if not name.startswith("__")  # __saved_model_init_op and the like
    )


def _text(data: bytes) -> str:
    return data[:_MAX_README_BYTES].decode("utf-8", errors="replace")


def _read_dir(directory: Path) -> tuple[tuple[bytes, bool] | None, str | None]:
    graph = None
    for marker in MODULE_MARKERS:
        path = directory / marker
        if path.is_file():
            graph = path.read_bytes(), marker.endswith(".pbtxt")
            break
    readme = None
    path = directory / _README
    # A link may point anywhere: only a README inside the module is shown.
    if path.is_file() and path.resolve().is_relative_to(directory.resolve()):
        with open(path, "rb") as f:
            readme = _text(f.read(_MAX_README_BYTES + 1))
    return graph, readme


def _read_archive(archive: Path) -> tuple[tuple[bytes, bool] | None, str | None]:
    """saved_model.pb and README.md from the archive's root, read in one pass.

    The pass stops once both are found, or once the graph is found and the variables
    begin: a README after them is not looked for, so that a page never inflates a big
    archive whole (``pack`` sorts members, which puts README.md first).
    """
    graph: tuple[bytes, bool] | None = None
    readme: str | None = None
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if graph is not None and name.startswith("variables/"):
                break
            if not member.isfile():
                continue
            if graph is None and name in MODULE_MARKERS and member.size <= _MAX_GRAPH_BYTES:
                f = tar.extractfile(member)
                if f is not None:
                    graph = f.read(), name.endswith(".pbtxt")
            elif readme is None and name == _README:
                f = tar.extractfile(member)
                if f is not None:
                    readme = _text(f.read(_MAX_README_BYTES + 1))
            if graph is not None and readme is not None:
                break
    return graph, readme


def describe(source: ModuleSource) -> Description:
    """Size, signatures and model card of a module (blocking: run it in a thread)."""
    if source.prebuilt:
        size = f"{human_size(source.path.stat().st_size)}, compressed"
    else:
        files = [p for p in source.path.resolve().rglob("*") if p.is_file()]
        total = sum(p.stat().st_size for p in files)
        size = f"{human_size(total)} in {len(files)} files, uncompressed"
    readme = None
    try:
        graph, readme = _read_archive(source.path) if source.prebuilt else _read_dir(source.path)
        if graph is None:
            return Description(size, (), "no saved_model.pb was found", readme)
        return Description(size, _describe_graph(graph[0], text=graph[1]), None, readme)
    except MissingDependencyError:
        note = 'signatures need TensorFlow on the server: pip install "asynchub[tensorflow]"'
        return Description(size, (), note, readme)
    except Exception as exc:  # a corrupt graph or archive must not break the page
        logger.warning("cannot read the signatures of %s: %s", source.id, exc)
        return Description(size, (), f"saved_model.pb could not be read: {exc}", readme)


def default_signature(signatures: Sequence[Signature]) -> Signature | None:
    """The signature a request without one runs (``serve --infer``'s rule), if any."""
    by_name = {s.name: s for s in signatures}
    for name in _DEFAULT_SIGNATURES:
        if name in by_name:
            return by_name[name]
    return signatures[0] if len(signatures) == 1 else None


# -- HTML ---------------------------------------------------------------------------------------

_STYLE = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--soft:#f6f8fa;--accent:#0969da}
*{box-sizing:border-box}
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
max-width:56rem;margin:0 auto;padding:1rem 1.25rem 3rem;overflow-wrap:anywhere}
a{color:var(--accent)}
header{border-bottom:1px solid var(--line);margin-bottom:1.25rem;padding-bottom:.5rem}
header a{color:var(--muted);text-decoration:none;font-size:.9rem}
h1{font-size:1.7rem;margin:.25rem 0}
h1 small{color:var(--muted);font-weight:normal;font-size:1rem}
h2{font-size:1.25rem;margin:2rem 0 .5rem;border-bottom:1px solid var(--line);
padding-bottom:.25rem}
h3{font-size:1.05rem;margin:1.25rem 0 .4rem}
code,pre{font:.875rem/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
:not(pre)>code{background:var(--soft);padding:.1rem .3rem;border-radius:4px}
pre{background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:.75rem 1rem;
overflow-x:auto;overflow-wrap:normal}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.5rem 0 1rem;min-width:50%}
td,th{border:1px solid var(--line);padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:var(--soft)}
.versions{display:flex;flex-wrap:wrap;gap:.4rem;align-items:center;margin:.5rem 0}
.versions a,.versions [aria-current]{border:1px solid var(--line);border-radius:999px;
padding:0 .6rem;text-decoration:none;font-size:.9rem;white-space:nowrap}
.versions [aria-current]{background:var(--accent);border-color:var(--accent);color:#fff}
td .versions{margin:0}
.tag{color:var(--muted);font-size:.85rem}
h1 .tag{border:1px solid var(--line);border-radius:999px;padding:0 .5rem;vertical-align:middle}
.meta{color:var(--muted)}
.card{border:1px solid var(--line);border-radius:6px;padding:0 1.25rem;margin:1rem 0}
.card>:first-child{margin-top:1rem}
.card img{max-width:100%}
@media (max-width:40rem){body{padding:.75rem .75rem 2rem}pre{padding:.5rem .6rem}
.card{padding:0 .75rem}}
.button{display:inline-block;background:var(--accent);color:#fff;border-radius:6px;
padding:.3rem .9rem;text-decoration:none;font-weight:600}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, base: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        '<meta name=viewport content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<header><a href='{_e(base)}/'>asynchub · all modules</a></header>\n"
        f"<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _href(base: str, source: ModuleSource) -> str:
    return _e(f"{base}/{quote(source.id)}")


def render_markdown(text: str) -> str:
    """CommonMark (plus tables) as HTML; raw HTML in it is escaped, links are checked
    (no ``javascript:``), and headings move one level down, under the page's own."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # an install from before the server extra listed it
        return f"<pre>{_e(text)}</pre>\n"
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1]) + 1, 6)}"
    return str(md.renderer.render(tokens, md.options, {}))


def index(
    sources: Sequence[ModuleSource],
    latest: dict[str, str | None],
    base: str,
    *,
    infer: bool = False,
) -> str:
    """The index: each module once, with its versions (each a link) and the latest."""
    by_name: dict[str, list[ModuleSource]] = {}
    for source in sources:
        by_name.setdefault(source.name, []).append(source)
    rows = []
    for name, found in by_name.items():
        newest = latest.get(name)
        head = next((s for s in found if s.version == newest), found[-1])
        links = " ".join(f"<a href='{_href(base, s)}'>{_e(s.version)}</a>" for s in found)
        rows.append(
            f"<tr><td><a href='{_href(base, head)}'><strong>{_e(name)}</strong></a></td>"
            f"<td><div class=versions>{links}</div></td><td>{_e(head.version)}</td></tr>"
        )
    if not rows:
        body = (
            "<h1>Modules</h1>\n<p>No modules yet: add <code>NAME/VERSION/</code> SavedModel "
            "directories or <code>NAME/VERSION.tar.gz</code> archives to the server's root.</p>"
        )
        return _page("Modules - asynchub", body, base)
    count = f"{len(rows)} module{'s' if len(rows) != 1 else ''}"
    intro = f"{count}. A name opens its latest version's page, which says how to load it"
    intro += (
        " and how to call it: this server also answers predictions under /v2." if infer else "."
    )
    body = (
        f"<h1>Modules</h1>\n<p class=meta>{_e(intro)}</p>\n<div class=scroll><table>\n"
        "<tr><th>module</th><th>versions</th><th>latest</th></tr>\n"
        + "\n".join(rows)
        + "\n</table></div>"
    )
    return _page("Modules - asynchub", body, base)


def _zeros(tensor: Tensor) -> list[Any]:
    count = math.prod(tensor.example_shape)
    value: Any = {"BOOL": False, "BYTES": ""}.get(tensor.datatype, 0)
    return [value] * count


def _curl(origin: str, path: str, signature: Signature, named: bool) -> str:
    inputs = [
        {
            "name": t.key,
            "datatype": t.datatype,
            "shape": t.example_shape,
            "data": _zeros(t),
        }
        for t in signature.inputs
    ]
    request: dict[str, Any] = {"inputs": inputs}
    if named:
        request["parameters"] = {"signature": signature.name}
    url = f"{origin}{path}"
    if sum(len(i["data"]) for i in inputs) <= _MAX_LITERAL_VALUES:
        lines = [
            "{",
            *(['  "parameters": ' + json.dumps(request["parameters"]) + ","] if named else []),
            '  "inputs": [',
            ",\n".join(f"    {json.dumps(i)}" for i in inputs),
            "  ]",
            "}",
        ]
        body = "\n".join(lines).replace("'", "'\\''")
        return f"curl -s {_shell(url)} -d '{body}'"
    # Too many zeros to read: a line of Python writes them.
    entries = [
        f'{{"name": {json.dumps(t.key)}, "datatype": "{t.datatype}", '
        f'"shape": {t.example_shape}, '
        f'"data": [{_PY_ZERO.get(t.datatype, "0")}] * {math.prod(t.example_shape)}}}'
        for t in signature.inputs
    ]
    parameters = f'"parameters": {{"signature": {json.dumps(signature.name)}}}, ' if named else ""
    document = f'{{{parameters}"inputs": [{", ".join(entries)}]}}'
    script = f'import json; json.dump({document}, open("request.json", "w"))'
    return f"python3 -c {_shell(script)}\ncurl -s {_shell(url)} -d @request.json"


def _shell(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _python(origin: str, base: str, source: ModuleSource, signature: Signature, named: bool) -> str:
    scheme, _, host = origin.partition("://")
    ssl = ", ssl=True" if scheme == "https" else ""
    lines = [
        "import numpy as np",
        "import tritonclient.http as httpclient",
        "",
        f"with httpclient.InferenceServerClient({json.dumps(host + base)}{ssl}) as client:",
        "    inputs = [",
    ]
    for t in signature.inputs:
        lines.append(
            f"        httpclient.InferInput({json.dumps(t.key)}, {t.example_shape}, "
            f'"{t.datatype}"),'
        )
    lines.append("    ]")
    lines.append("    # Your data here, in these shapes:")
    for i, t in enumerate(signature.inputs):
        shape = t.example_shape
        zeros = f"np.zeros({shape}, {_NUMPY.get(t.datatype, f'np.{t.datatype.lower()}')})"
        if t.datatype == "BYTES":
            zeros = f"np.full({shape}, b'', object)"
        lines.append(f"    inputs[{i}].set_data_from_numpy({zeros})")
    call = f"client.infer({json.dumps(source.name)}, inputs"
    call += f", model_version={json.dumps(source.version)}"
    if named:
        call += f', parameters={{"signature": {json.dumps(signature.name)}}}'
    lines.append(f"    result = {call})")
    for t in signature.outputs:
        lines.append(f"    print(result.as_numpy({json.dumps(t.key)}))")
    return "\n".join(lines)


def _how_to_call(source: ModuleSource, info: Description, origin: str, base: str) -> list[str]:
    """The "Call it" section of ``serve --infer``: metadata URL, curl and tritonclient."""
    model = f"{base}/v2/models/{quote(source.name)}/versions/{quote(source.version)}"
    parts = [
        "<h2 id=call>Call it</h2>",
        "<p>This server answers predictions over the Open Inference Protocol (KServe v2, "
        f"Triton's REST API). The model's metadata: <a href='{_e(model)}'>"
        f"<code>{_e(origin + model)}</code></a>.</p>",
    ]
    signature = default_signature(info.signatures)
    named = signature is None and bool(info.signatures)
    if signature is None and info.signatures:
        signature = info.signatures[0]
        parts.append(
            f"<p>It has no default signature, so the examples name "
            f"<code>{_e(signature.name)}</code> in the request's parameters.</p>"
        )
    if signature is None:
        parts.append(
            "<p>Its signatures are not known here (see below); the metadata lists them.</p>"
        )
        return parts
    parts += [
        "<p>With <code>curl</code>, placeholder zeros in the shape of one request "
        "(<code>-1</code> dimensions are shown as 1):</p>",
        f"<pre><code>{_e(_curl(origin, model + '/infer', signature, named))}</code></pre>",
        "<p>With <code>tritonclient.http</code> (<code>pip install tritonclient[http]</code>):</p>",
        f"<pre><code>{_e(_python(origin, base, source, signature, named))}</code></pre>",
    ]
    return parts


def module(
    source: ModuleSource,
    info: Description,
    *,
    url: str,
    base: str,
    versions: Sequence[ModuleSource],
    latest: str | None,
    infer: bool,
) -> str:
    """A module's page: versions, download, model card, how to load and call it, signatures.

    ``url`` is this page's own URL (without a query), the handle ``hub.load`` takes.
    """
    origin = url.split("://", 1)[0] + "://" + url.split("://", 1)[-1].split("/", 1)[0]
    badge = " <span class=tag>latest</span>" if source.version == latest else ""
    parts = [f"<h1>{_e(source.name)} <small>version {_e(source.version)}</small>{badge}</h1>"]
    if versions:
        links = []
        for other in versions:
            label = _e(other.version) + (" (latest)" if other.version == latest else "")
            if other.version == source.version:
                links.append(f"<span aria-current=page>{label}</span>")
            else:
                links.append(f"<a href='{_href(base, other)}'>{label}</a>")
        parts.append(
            "<nav class=versions aria-label=versions><span class=tag>Versions:</span> "
            + " ".join(links)
            + "</nav>"
        )
    kind = "Prebuilt archive" if source.prebuilt else "SavedModel directory"
    parts.append(
        f"<p class=meta>{kind}, {_e(info.size)}.</p>"
        "<p><a class=button href='?tf-hub-format=compressed'>Download the tar.gz</a></p>"
    )
    if info.readme is not None:
        parts.append(
            "<h2 id=card>Model card</h2>\n<section class=card>\n"
            f"{render_markdown(info.readme)}</section>"
        )
    snippet = f'import asynchub as hub\n\nm = hub.load("{url}")'
    parts += ["<h2 id=use>Use it</h2>", f"<pre><code>{_e(snippet)}</code></pre>"]
    if infer:
        parts += _how_to_call(source, info, origin, base)
    parts.append("<h2 id=signatures>Signatures</h2>")
    if info.note:
        parts.append(f"<p>{_e(info.note)}</p>")
    elif not info.signatures:
        parts.append("<p>This module has no signatures.</p>")
    for sig in info.signatures:
        parts.append(f"<h3><code>{_e(sig.name)}</code></h3>")
        parts.append(
            "<div class=scroll><table><tr><th></th><th>name</th><th>dtype</th><th>shape</th></tr>"
        )
        for kind_, tensors in (("input", sig.inputs), ("output", sig.outputs)):
            for t in tensors:
                parts.append(
                    f"<tr><td>{kind_}</td><td><code>{_e(t.key)}</code></td>"
                    f"<td>{_e(t.dtype)}</td><td>{_e(t.shape)}</td></tr>"
                )
        parts.append("</table></div>")
    return _page(f"{source.id} - asynchub", "\n".join(parts), base)
