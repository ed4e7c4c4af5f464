"""The pages people browse, served by the real app: the index, each module's page with its
versions, its README.md as a model card and, with ``--infer``, how to call it; the
snippets are run against the server, and a real browser renders the pages."""

from __future__ import annotations

import contextlib
import html.parser
import io
import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from asynchub._pack import pack
from asynchub._serving import pages

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from asynchub.server import InferOptions, create_app, serve_in_thread

README = """\
# Fruit model

Sums *three* numbers per row, doubled.

<script>alert("owned")</script>

| input | shape |
| --- | --- |
| x | [-1, 3] |

[a link](javascript:alert(1)) and [the docs](https://example.com/docs).
"""


@dataclass
class Site:
    plain: str  # the base URL of `asynchub serve ROOT`
    infer: str  # the base URL of `asynchub serve ROOT --infer`


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    pytest.importorskip("tensorflow")
    from tests import _savedmodels

    tmp = tmp_path_factory.mktemp("pages")
    root = tmp / "root"
    one = _savedmodels.fruit_module(root / "fruit" / "1")
    (one / "README.md").write_text(README)
    two = shutil.copytree(one, tmp / "fruit-2")
    (two / "README.md").write_text("# Fruit, second edition\n\nNow packed.\n")
    pack(two, root / "fruit" / "2.tar.gz")
    _savedmodels.signatures_module(root / "google" / "pair" / "1", ["left", "right"])
    linked = root / "linked" / "1"
    (linked / "variables").mkdir(parents=True)
    (linked / "saved_model.pb").write_bytes(b"not a graph")
    (tmp / "secret.md").write_text("# Secret outside ROOT\n")
    (linked / "README.md").symlink_to(tmp / "secret.md")
    plain = create_app(root, cache_dir=tmp / "cache-plain")
    infer = create_app(root, cache_dir=tmp / "cache-infer", infer=InferOptions())
    with serve_in_thread(plain) as plain_base, serve_in_thread(infer) as infer_base:
        yield Site(plain_base, infer_base)


def page(base: str, path: str) -> str:
    response = httpx.get(base + path, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    return response.text


class _Checker(html.parser.HTMLParser):
    """Fails on an element closed out of order or left open (void elements aside)."""

    VOID: ClassVar = {"meta", "link", "br", "hr", "img", "input", "source", "col", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, (tag, self.open)
        self.open.pop()


def well_formed(document: str) -> None:
    assert document.startswith("<!DOCTYPE html>\n<html lang=en>")
    assert '<meta name=viewport content="width=device-width, initial-scale=1">' in document
    checker = _Checker()
    checker.feed(document)
    checker.close()
    assert checker.open == []


# -- the index and the module pages ---------------------------------------------------------


@pytest.mark.tf
def test_index_lists_each_module_once(site: Site) -> None:
    document = page(site.plain, "/")
    well_formed(document)
    rows = re.findall(r"<tr><td>.*?</tr>", document)
    assert len(rows) == 3  # fruit, google/pair, linked
    fruit = next(r for r in rows if "<strong>fruit</strong>" in r)
    assert "href='/fruit/1'>1</a>" in fruit
    assert "href='/fruit/2'>2</a>" in fruit
    assert fruit.endswith("<td>2</td></tr>")  # the latest
    assert "<a href='/fruit/2'><strong>fruit</strong></a>" in fruit


@pytest.mark.tf
def test_module_page_links_its_versions(site: Site) -> None:
    document = page(site.plain, "/fruit/1")
    well_formed(document)
    assert "<span aria-current=page>1</span>" in document
    assert "<a href='/fruit/2'>2 (latest)</a>" in document
    newer = page(site.plain, "/fruit/2")
    assert "<span aria-current=page>2 (latest)</span>" in newer
    assert "<a href='/fruit/1'>1</a>" in newer


@pytest.mark.tf
def test_readme_is_the_model_card(site: Site) -> None:
    document = page(site.plain, "/fruit/1")
    assert "<h2>Fruit model</h2>" in document  # one level below the page's own h1
    assert "<em>three</em>" in document
    assert "<th>input</th>" in document
    assert "<script>" not in document  # raw HTML in a README is shown, never run
    assert "&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt;" in document
    assert 'href="javascript' not in document  # markdown-it refuses such links
    assert '<a href="https://example.com/docs">the docs</a>' in document
    # From a prebuilt archive, read without extracting it.
    assert "<h2>Fruit, second edition</h2>" in page(site.plain, "/fruit/2")
    # A README linked to outside the module is not shown.
    linked = page(site.plain, "/linked/1")
    assert "Secret" not in linked
    assert "Model card" not in linked
    assert "Model card" not in page(site.plain, "/google/pair/1")


@pytest.mark.tf
def test_pages_without_infer_do_not_offer_calls(site: Site) -> None:
    assert "Call it" not in page(site.plain, "/fruit/1")


@pytest.mark.tf
def test_page_shows_how_to_call_the_model(site: Site) -> None:
    document = page(site.infer, "/fruit/1")
    well_formed(document)
    text = html.unescape(document)
    metadata = f"{site.infer}/v2/models/fruit/versions/1"
    assert metadata in text
    assert httpx.get(metadata, timeout=60).status_code == 200
    snippets = re.findall(r"<pre><code>(.*?)</code></pre>", document, re.S)
    curl = next(html.unescape(s) for s in snippets if s.startswith("curl"))
    python = next(html.unescape(s) for s in snippets if "tritonclient" in s)
    assert '"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [0, 0, 0]' in curl
    assert 'httpclient.InferInput("x", [1, 3], "FP32")' in python

    # Both run as shown, against this server.
    ran = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
    answer = json.loads(ran.stdout)
    assert answer["model_version"] == "1"
    assert {o["name"] for o in answer["outputs"]} == {"default", "extra"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(python, {})  # the page's own snippet, run as a reader would
    assert "[0.]" in printed.getvalue()


@pytest.mark.tf
def test_snippets_name_a_signature_when_there_is_no_default(site: Site) -> None:
    document = page(site.infer, "/google/pair/1")
    snippets = re.findall(r"<pre><code>(.*?)</code></pre>", document, re.S)
    curl = next(html.unescape(s) for s in snippets if s.startswith("curl"))
    assert '"parameters": {"signature": "left"}' in curl
    ran = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
    assert json.loads(ran.stdout)["outputs"][0]["name"] == "output", ran.stdout


# -- pure parts ----------------------------------------------------------------------------


def test_datatypes_are_the_protocols() -> None:
    pytest.importorskip("numpy")
    from asynchub._serving import oip

    assert dict(oip.DATATYPES) == pages.DATATYPES


def test_a_big_input_is_written_by_a_script(tmp_path: Path) -> None:
    image = pages.Tensor("image", "float32", (-1, 224, 224, 3))
    flag = pages.Tensor("flag", "bool", None)
    word = pages.Tensor("it's", "string", (2,))
    signature = pages.Signature("serving_default", (image, flag, word), ())
    snippet = pages._curl("http://127.0.0.1:1", "/v2/models/m/infer", signature, True)
    assert "-d @request.json" in snippet
    script = snippet.splitlines()[0]
    subprocess.run(["bash", "-c", script], cwd=tmp_path, check=True, timeout=60)
    request = json.loads((tmp_path / "request.json").read_text())
    assert request["parameters"] == {"signature": "serving_default"}
    sent = {i["name"]: i for i in request["inputs"]}
    assert sent["image"]["shape"] == [1, 224, 224, 3]
    assert len(sent["image"]["data"]) == 224 * 224 * 3
    assert sent["flag"] == {"name": "flag", "datatype": "BOOL", "shape": [1], "data": [False]}
    assert sent["it's"]["data"] == ["", ""]


def test_everything_shown_is_escaped(tmp_path: Path) -> None:
    from asynchub._serving.repository import ModuleSource

    evil = "<b>&'\""
    source = ModuleSource(f"a/{evil}", evil, tmp_path, False)
    tensor = pages.Tensor(evil, evil, (-1,))
    info = pages.Description(evil, (pages.Signature(evil, (tensor,), (tensor,)),), None, evil)
    document = pages.module(
        source, info, url="http://h/x", base="", versions=[source], latest=evil, infer=True
    )
    well_formed(document)
    assert "<b>" not in document
    document = pages.index([source], {source.name: evil}, "")
    well_formed(document)
    assert "<b>" not in document


# -- a real browser ----------------------------------------------------------------------------

SHOTS = Path(os.environ.get("ASYNCHUB_PAGE_SHOTS", "/tmp/pages"))


def browse(url: str, tmp_path: Path, name: str, width: int = 1200) -> str:
    """The DOM headless Chromium renders for ``url``; a screenshot goes to SHOTS/name.png.

    The screenshot and the DOM are two runs of Chromium (it does one per run), side by side.
    """

    def chromium(action: str, profile: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / profile}",
                f"--window-size={width},1400",
                action,
                url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    shot = tmp_path / f"{name}.png"
    shooting = chromium(f"--screenshot={shot}", f"{name}-shot")
    dumping = chromium("--dump-dom", f"{name}-dom")
    dom, _ = dumping.communicate(timeout=120)
    shooting.communicate(timeout=120)
    assert (shooting.returncode, dumping.returncode) == (0, 0)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (width, 1400)
    assert len(png) > 20_000, "the screenshot is (nearly) blank"
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / f"{name}.png").write_bytes(png)
    return dom


@pytest.mark.tf
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium")
def test_a_browser_renders_the_pages(site: Site, tmp_path: Path) -> None:
    index = browse(f"{site.infer}/", tmp_path, "index")
    assert "<strong>fruit</strong>" in index
    assert 'href="/fruit/1"' in index and 'href="/fruit/2"' in index

    module = browse(f"{site.infer}/fruit/1", tmp_path, "module-infer")
    assert "<h2>Fruit model</h2>" in module
    assert '<a href="/fruit/2">2 (latest)</a>' in module
    assert 'httpclient.InferInput("x", [1, 3], "FP32")' in html.unescape(module)
    assert "<script" not in module  # the README's script is text on the page
    assert "&lt;script&gt;" in module

    archive = browse(f"{site.plain}/fruit/2", tmp_path, "module-archive")
    assert "<h2>Fruit, second edition</h2>" in archive
    assert "Call it" not in archive

    phone = browse(f"{site.infer}/fruit/1", tmp_path, "module-phone", width=390)
    assert "<h2>Fruit model</h2>" in phone
