"""The node's page in a real headless Chromium (Debian's, /usr/bin/chromium; `make browser` installs it), driven by
Playwright: the patient records a file end to end, the provider finds, fetches, decrypts and downloads it, bytes
identical; errors from the API are shown; in signed mode grants, the audit and a break-glass open. Every request
the page makes goes to the node (loopback) and to an endpoint /openapi.json documents, under the page's
Content-Security-Policy, with no error in the console. Screenshots of each page go to .state/screenshots/.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest
import requests

import openapi
from conftest import wait_until
from scripts.cluster import ROOT, Kubo, NodeProcess
from test_postman import shape

CHROMIUM = Path(os.environ.get("EMR_CHROMIUM", "/usr/bin/chromium"))
# As the machine's notes say Chromium must run here: headless, and no network of its own beyond loopback.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / ".state" / "screenshots"
KEY = "correct-horse-battery-staple-0123456789"
PASSWORD = "shared with healthcare B"
RECORD_BYTES = 3 * 1024 * 1024  # large enough for the upload to report progress
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1200, "height": 900}
STEP_MS = 30_000

pytestmark = pytest.mark.process

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - requirements.txt installs it
    sync_playwright = None


def browser_missing() -> str | None:
    if sync_playwright is None:
        return "Playwright is not installed (pip install -r requirements.txt)"
    if not CHROMIUM.is_file():
        return (f"no browser at {CHROMIUM}: `make browser` installs Debian's chromium (apt-get install chromium "
                f"chromium-driver), which could not be done on this machine")
    return None


class Browser:
    """One headless Chromium with a fresh profile, every request it makes recorded (and any off loopback
    refused), every console error and CSP violation kept."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.requests: list[tuple[str, str]] = []
        self.foreign: list[str] = []
        self.problems: list[str] = []
        context.route("**/*", self._route)

    def _route(self, route: Any) -> None:
        url = urlsplit(route.request.url)
        if url.scheme in ("blob", "data"):
            route.continue_()
            return
        if url.hostname != "127.0.0.1":
            self.foreign.append(route.request.url)
            route.abort()
            return
        self.requests.append((route.request.method, url.path))
        route.continue_()

    def page(self, url: str, name: str, viewport: dict[str, int] = DESKTOP) -> Page:
        page = self.context.new_page()
        page.set_viewport_size(viewport)
        page.set_default_timeout(STEP_MS)
        page.on("console", lambda message: message.type == "error" and self.problems.append(f"{name}: {message.text}"))
        page.on("pageerror", lambda error: self.problems.append(f"{name}: {error}"))
        page.goto(url)
        page.evaluate("""() => document.addEventListener('securitypolicyviolation',
                         (e) => console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI))""")
        return page

    def check(self, expected_errors: int = 0) -> None:
        """Nothing but the node was asked, only documented endpoints, and no script failed."""
        assert not self.foreign, f"the page asked beyond loopback: {self.foreign}"
        documented = {(method.upper(), shape(path)) for path, methods in openapi.PATHS.items() for method in methods}
        undocumented = sorted({(method, path) for method, path in self.requests
                               if (method, shape(path)) not in documented
                               and (method, shape(openapi.route_path(path))) not in documented
                               and not path.startswith("/static/")})
        assert not undocumented, f"requests of the page that /openapi.json does not list: {undocumented}"
        unexpected = [problem for problem in self.problems if "status of 4" not in problem]
        assert not unexpected, "\n".join(unexpected)
        assert not any("CSP violation" in problem or "Content Security Policy" in problem
                       for problem in self.problems), self.problems


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    profile = Path(tempfile.mkdtemp(prefix="emr-chromium-"))
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS, env=env,
            accept_downloads=True, viewport=DESKTOP, downloads_path=str(tmp_path / "downloads"))
        try:
            yield Browser(context)
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def shot(page: Page, name: str, full: bool = True) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full)


def tab(page: Page, name: str) -> None:
    page.click(f'#tabs button[data-tab="{name}"]')


def type_key(page: Page, key: str) -> None:
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")


def publish(page: Page, path: Path, ehr: str, password: str | None) -> str:
    """Choose a file, encrypt, add and record it (and mine it) from the patient's page; the answer shown."""
    tab(page, "records")
    page.evaluate("""() => { window.progressSeen = [];
        new MutationObserver(() => { const bar = document.getElementById('publish-progress');
            window.progressSeen.push([bar.hidden, bar.getAttribute('value')]); })
        .observe(document.getElementById('publish-progress'), {attributes: true}); }""")
    page.set_input_files("#publish-file", str(path))
    page.fill("#publish-ehr", ehr)
    page.fill("#publish-user", "xxxxx")
    if password is not None:
        page.fill("#publish-password", password)
    else:
        expect(page.locator("#publish-password")).to_be_hidden()
    page.click("#publish")
    expect(page.locator("#publish-result")).to_contain_text("Mined into block")
    seen = page.evaluate("window.progressSeen")
    assert [False, "0"] in seen or any(not hidden for hidden, _ in seen), f"the progress bar never showed: {seen}"
    return page.locator("#publish-result").inner_text()


def find(page: Page, name: str) -> None:
    tab(page, "records")
    page.fill("#search-name", name)
    page.click("#search")
    expect(page.locator("#versions .version").first).to_be_visible()


def download(page: Page, target: Path) -> bytes:
    expect(page.locator("#download")).to_be_visible()
    with page.expect_download() as waiting:
        page.click("#download")
    waiting.value.save_as(str(target))
    return target.read_bytes()


def no_horizontal_scroll(page: Page) -> None:
    wider = page.evaluate("""() => [...document.querySelectorAll('body *')].filter((e) => {
        const box = e.getBoundingClientRect(); return box.width > 0 && box.right > window.innerWidth + 1; })
        .slice(0, 5).map((e) => `${e.tagName.toLowerCase()}#${e.id}.${e.className}`)""")
    assert not wider, f"wider than a phone's screen: {wider}"


def keyed(node: NodeProcess, path: str, body: Any = None) -> requests.Response:
    call = requests.post if body is not None else requests.get
    return call(node.url + path, json=body, headers={"X-API-Key": KEY}, timeout=30)


# -- the paper's network -----------------------------------------------------------------------

def test_the_patient_records_a_file_and_the_provider_downloads_it_decrypted(browser: Browser, spawn_node,
                                                                           kubo: Kubo, tmp_path: Path) -> None:
    patient = spawn_node("patient", ipfs_api=kubo.api_url, api_key=KEY)
    provider = spawn_node("healthcare_provider", ipfs_api=kubo.api_url, api_key=KEY)
    patient.get("/health")
    assert keyed(patient, "/connect_node", {"nodes": [provider.url]}).status_code == 201
    record = tmp_path / "MRI scan.pdf"
    record.write_bytes(b"%PDF-1.4\n" + os.urandom(RECORD_BYTES))

    # The patient: a wrong key is refused with the API's own message and not kept; the right one opens the page.
    page = browser.page(patient.url, "patient")
    type_key(page, "not-the-key-at-all-0000")
    expect(page.locator("#notice")).to_contain_text("401: this node needs an API key")
    assert page.evaluate("sessionStorage.getItem('emr-chain-api-key')") is None
    type_key(page, KEY)
    expect(page.locator("#who")).to_contain_text("patient")
    expect(page.locator("#who")).to_contain_text("paper's open network")
    assert page.evaluate("sessionStorage.getItem('emr-chain-api-key')") == KEY
    answer = publish(page, record, "MRI", PASSWORD)
    assert "encrypted with the password you gave" in answer
    shot(page, "patient-records")
    tab(page, "chain")
    expect(page.locator("#blocks .block").first).to_contain_text("Block 2")
    expect(page.locator("#blocks .block").first).to_contain_text("MRI scan.pdf.aes")
    shot(page, "patient-chain")

    # The provider: finds it, a wrong password is refused and said so, the right one decrypts it.
    wait_until(lambda: len(keyed(provider, "/get_chain").json()["chain"]) == 2, timeout=15)
    view = browser.page(provider.url, "provider")
    type_key(view, KEY)
    expect(view.locator("#who")).to_contain_text("healthcare provider")
    expect(view.locator("#publish-form")).to_be_hidden()
    find(view, "MRI")
    expect(view.locator("#versions .version")).to_have_count(1)
    view.fill("#open-password", "not the password")
    view.click("#versions .version button.open")
    expect(view.locator("#notice")).to_contain_text("400: ")
    expect(view.locator("#notice")).to_contain_text("wrong password")
    view.fill("#open-password", PASSWORD)
    view.click("#versions .version button.open")
    expect(view.locator("#open-result")).to_contain_text("downloads/MRI scan.pdf")
    expect(view.locator("#notice")).to_be_hidden()
    assert download(view, tmp_path / "downloaded.pdf") == record.read_bytes()
    shot(view, "provider-records")

    tab(view, "chain")
    block = view.locator("#blocks .block").first
    expect(block).to_contain_text("valid")
    block.locator("summary").click()
    expect(block.locator("pre.json")).to_contain_text('"EHR_name": "MRI"')
    shot(view, "provider-chain")
    tab(view, "network")
    expect(view.locator("#nodes .node")).to_have_count(2)
    expect(view.locator("#nodes")).to_contain_text("patient")
    expect(view.locator("#nodes")).to_contain_text("up to date")
    shot(view, "provider-network")

    # A phone-sized screen: everything fits its width.
    view.set_viewport_size(PHONE)
    for name in ("records", "chain", "network"):
        tab(view, name)
        no_horizontal_scroll(view)
    tab(view, "records")
    shot(view, "provider-records-phone")
    browser.check()


# -- a signed network: consent ------------------------------------------------------------------

def test_on_a_signed_network_the_page_grants_opens_audits_and_shows_a_refusal(browser: Browser, signed_network,
                                                                            kubo: Kubo, tmp_path: Path) -> None:
    patient, authority, provider = signed_network(network={"emergency_members": "healthcare_authority"},
                                                  ipfs_api=kubo.api_url)
    nodes = (patient, authority, provider)
    patient.post("/connect_node", {"nodes": [authority.url, provider.url]})
    wait_until(lambda: len(provider.get("/health").json()["peers"]) == 1)
    record = tmp_path / "MRI.pdf"
    record.write_bytes(b"%PDF-1.4\n" + os.urandom(200_000))

    def settle() -> None:
        """What the others recorded (their accesses) mined by the patient, and every node on one chain."""
        wait_until(lambda: patient.get("/health").json()["pending"] >= max(n.get("/health").json()["pending"]
                                                                           for n in nodes))
        if patient.get("/health").json()["pending"]:
            assert patient.get("/mine_block").status_code == 200
        wait_until(lambda: len({len(node.chain()) for node in nodes}) == 1, timeout=15)

    mine = browser.page(patient.url, "patient")
    expect(mine.locator("#who")).to_contain_text("signed network")
    expect(mine.locator('#tabs [data-tab="consent"]')).to_be_visible()
    assert "a key of its own" in publish(mine, record, "MRI", None)
    settle()

    theirs = browser.page(provider.url, "provider")
    expect(theirs.locator("#who")).to_contain_text("healthcare provider")
    find(theirs, "MRI")
    theirs.fill("#open-purpose", "follow-up")
    theirs.click("#versions .version button.open")
    expect(theirs.locator("#notice")).to_contain_text("403: no grant of record")  # the API's own refusal
    settle()

    tab(mine, "consent")
    provider_id = provider.get("/identity").json()["node_id"]
    mine.fill("#grant-record", "MRI")
    mine.select_option("#grant-member", provider_id)
    mine.fill("#grant-purpose", "follow-up")
    mine.click("#grant")
    expect(mine.locator("#grants .grant").first).to_contain_text("active")
    settle()

    theirs.click("#versions .version button.open")
    expect(theirs.locator("#open-result")).to_contain_text("Opened with a grant")
    assert download(theirs, tmp_path / "opened.pdf") == record.read_bytes()
    shot(theirs, "signed-provider-records")

    emergency = browser.page(authority.url, "authority")
    find(emergency, "MRI")
    emergency.check("#open-emergency")
    emergency.fill("#open-reason", "unconscious in the ER")
    emergency.click("#versions .version button.open")
    expect(emergency.locator("#open-result")).to_contain_text("emergency")
    settle()

    mine.click("#audit-refresh")
    timeline = mine.locator("#audit li")
    expect(timeline).to_have_count(3)
    expect(timeline.first).to_contain_text("EMERGENCY")
    expect(mine.locator("#audit")).to_contain_text("refused")
    expect(mine.locator("#audit")).to_contain_text("opened")
    mine.locator("#grants .grant button.revoke").click()
    expect(mine.locator("#grants .grant").first).to_contain_text("revoked")
    shot(mine, "signed-patient-consent")
    mine.set_viewport_size(PHONE)
    no_horizontal_scroll(mine)
    shot(mine, "signed-patient-consent-phone")
    tab(mine, "chain")
    expect(mine.locator("#blocks .block").first).to_contain_text("mined and signed by patient")
    tab(mine, "network")
    expect(mine.locator("#nodes .node")).to_have_count(3)
    browser.check()
