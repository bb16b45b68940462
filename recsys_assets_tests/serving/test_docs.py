"""API docs: /docs renders in a real headless Chromium with no network beyond the server,
and the schema lists the configured surfaces and regions.

The browser test needs Debian's `chromium` (CI installs it in .ci/run); without it the test
fails, naming the package, rather than skipping: a skipped check would hide blank docs.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import uvicorn
from fastapi.testclient import TestClient
from playwright.sync_api import Request, Route, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from recsys_assets.serving.api import create_app
from recsys_assets_tests.serving.conftest import World

OPERATIONS = {
    ("get", "/v1/recommendations/{surface}"),
    ("post", "/v1/events"),
    ("get", "/v1/t/open/{token}"),
    ("get", "/v1/t/click/{token}"),
    ("post", "/v1/admin/kill"),
    ("delete", "/v1/admin/kill"),
    ("get", "/v1/admin/kill"),
    ("get", "/metrics"),
    ("get", "/healthz"),
}


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "no chromium binary on PATH: the /docs test drives a real headless browser. Install "
        "Debian's package (`apt-get install -y --no-install-recommends chromium`, as .ci/run "
        "does) and rerun"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def server_url(world: World) -> Iterator[str]:
    """The real app under uvicorn on a free loopback port."""
    world.publish_consumer_list(20)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(world.service(start=True)), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_docs_render_every_operation_offline_in_headless_chromium(
    server_url: str, world: World
) -> None:
    """Swagger UI's JavaScript runs from the server's own assets and inserts the operations;
    any request for another host is refused and recorded, so a CDN reference fails here."""
    executable = _chromium()
    server = urlsplit(server_url).netloc
    elsewhere: list[str] = []
    failed: list[str] = []
    errors: list[str] = []

    def local_only(route: Route, request: Request) -> None:
        if urlsplit(request.url).netloc == server:
            route.continue_()
        else:
            elsewhere.append(request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.route("**/*", local_only)
            page.goto(f"{server_url}/docs", wait_until="load")
            try:
                page.wait_for_selector(".opblock-summary-path", timeout=20_000)
            except PlaywrightTimeout:
                pytest.fail(
                    f"Swagger UI rendered no operation at {server_url}/docs within 20 s; "
                    f"requests for other hosts (refused): {elsewhere}; failed requests: "
                    f"{failed}; page errors: {errors}"
                )
            rendered = page.eval_on_selector_all(
                ".opblock",
                """blocks => blocks.map(block => [
                    block.querySelector('.opblock-summary-method').textContent.toLowerCase(),
                    block.querySelector('.opblock-summary-path').getAttribute('data-path'),
                ])""",
            )
            recommendations = page.locator(".opblock-get", has_text="/v1/recommendations/")
            recommendations.locator(".opblock-summary").click()
            surface = recommendations.locator("tr[data-param-name='surface'] select")
            surface.wait_for(timeout=10_000)
            surface_options = surface.locator("option").all_inner_texts()
            region_options = (
                recommendations.locator("tr[data-param-name='region'] select option")
            ).all_inner_texts()
        finally:
            browser.close()

    assert {(method, path) for method, path in rendered} == OPERATIONS
    assert set(world.settings.surfaces) <= set(surface_options)
    assert set(world.settings.regions) <= set(region_options)
    assert elsewhere == [], f"/docs asked for other hosts: {elsewhere}"
    assert failed == [] and errors == []


def test_schema_enumerates_the_configured_surfaces_and_regions(world: World) -> None:
    """From the Settings the app is built with, not the default configuration."""
    settings = world.settings.model_copy(
        update={
            "regions": ("na", "mars"),
            "surfaces": {"home_feed": world.settings.surfaces["home_feed"]},
        }
    )
    world.settings = settings
    app = create_app(world.service())
    with TestClient(app) as client:
        spec = client.get("/openapi.json").json()
        unknown = client.get("/v1/recommendations/push", params={"subject_id": 1, "region": "na"})
    parameters = {
        parameter["name"]: parameter["schema"]
        for parameter in spec["paths"]["/v1/recommendations/{surface}"]["get"]["parameters"]
    }
    assert parameters["surface"]["enum"] == ["home_feed"]
    assert parameters["region"]["enum"] == ["na", "mars"]
    schemas = spec["components"]["schemas"]
    assert schemas["RecommendationOut"]["properties"]["surface"]["enum"] == ["home_feed"]
    assert schemas["RecommendationOut"]["properties"]["region"]["enum"] == ["na", "mars"]
    event_region = schemas["EventIn"]["properties"]["region"]["anyOf"]
    assert {"type": "string", "enum": ["na", "mars"]} in event_region
    # The enum documents; the service still answers an unknown surface with its own message.
    assert unknown.status_code == 404
    assert "configured surfaces: ['home_feed']" in unknown.json()["error"]
