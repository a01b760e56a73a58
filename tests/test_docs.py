"""The documentation: the site builds strictly, the configuration page is the settings class's,
the README is short and its links and code blocks hold."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pydantic import Field

import check_readme
import config_docs
from conftest import served_engine
from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))


def _html(site: Path, name: str) -> Path:
    return site / ("index.html" if name == "index" else f"{name.removesuffix('/index')}/index.html")


def _page(site: Path, name: str) -> _Ids:
    page = _html(site, name)
    parser = _Ids()
    parser.feed(page.read_text())
    return parser


def test_the_site_builds_strictly_with_every_page(site):
    for name in ["index", "api", "configuration", "deployment", "operations", "benchmark", "benchmark/latest",
                 "benchmark/soak", "design", "rules", "development"]:
        assert _page(site, name).ids, name
    # The design decisions page is RULES.md itself, included from the root.
    assert "Each rule says what we do and why." in (site / "rules" / "index.html").read_text()


@pytest.mark.parametrize("name, plots", [("benchmark/latest", 2), ("benchmark/soak", 1)])
def test_the_benchmark_pages_show_their_plots(site, name, plots):
    images = [src for src in _page(site, name).images if src.endswith((".svg", ".png"))]
    assert len(images) >= plots, images
    for src in images:
        assert (_html(site, name).parent / src).resolve().is_file(), src


def test_the_configuration_page_is_the_settings_class():
    assert (ROOT / "docs" / "configuration.md").read_text() == config_docs.render()
    page = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        assert f"| `{name.upper()}` |" in page, name
        assert field.description.replace("|", "\\|") in page, name


def test_a_setting_missing_from_the_page_or_described_otherwise_is_found():
    class More(Settings):
        extra_setting: int = Field(3, ge=1, description="A setting the page does not have.")

    class Changed(Settings):
        max_batch_size: int = Field(8, ge=1, le=64, description="Another description.")

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert config_docs.render(More) != page and "`EXTRA_SETTING` | `3` | integer ≥ 1 |" in config_docs.render(More)
    assert config_docs.render(Changed) != page
    assert config_docs.main(["--check"]) == 0


def test_the_readme_is_short_and_its_links_hold(site):
    assert len(README.splitlines()) <= 300
    for target in re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", README):
        path, anchor = target
        if path.startswith("http"):
            continue
        assert (ROOT / path).exists(), path
        if anchor:
            assert path.startswith("docs/") and path.endswith(".md"), (path, anchor)
            name = path.removeprefix("docs/").removesuffix(".md")
            assert anchor in _page(site, name).ids, f"{path}#{anchor}"


def test_every_readme_code_block_is_run_by_the_docker_check_or_says_why_not():
    found = check_readme.blocks(README)
    assert check_readme.check_languages(found) == []
    runnable = [b for b in found if b.lang in check_readme.RUNNABLE]
    assert {b.code.strip() for b in runnable if b.skipped} == set(check_readme.SKIPPED)
    assert any(b.lang == "python" for b in runnable) and any("curl" in b.code for b in runnable)
    assert all(check_readme.LOCAL.search(b.code) for b in runnable if not b.skipped)


@pytest.fixture(scope="module")
def live_server_url(litert_engine, litert_model_dir):
    with served_engine(litert_engine, litert_model_dir, "distilgpt2") as url:
        yield url


def test_readme_blocks_run_against_a_live_server(live_server_url):
    port = int(live_server_url.rsplit(":", 1)[1])
    readme_blocks = [b for b in check_readme.blocks(README) if b.lang in check_readme.RUNNABLE and not b.skipped]
    for block in readme_blocks:
        assert check_readme.run(block, port, sys.executable, timeout=120) is None, block.line
    # A block that fails, or prints an error body, is caught.
    wrong = check_readme.Block("sh", "curl -s localhost:8000/v1/completions -H 'content-type: application/json' "
                               "-d '{\"model\": \"no-such-model\", \"prompt\": \"x\"}'", 1)
    assert "error body" in check_readme.run(wrong, port, sys.executable, timeout=60)
    assert "exit 3" in check_readme.run(check_readme.Block("python", "raise SystemExit(3)", 1), port, sys.executable, 60)


def test_every_setting_the_configuration_page_lists_can_be_set_in_compose():
    """docs/deployment.md says every setting can go in `.env`: the api service passes each one
    through (HOST excepted: the image listens on 0.0.0.0, and the published address is Compose's)."""
    import yaml

    environment = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]["environment"]
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in environment]
    assert missing == ["HOST"]
