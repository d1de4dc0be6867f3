"""The status page in a real browser: Debian's Chromium, headless, driven by Playwright
(tests/node/admin_status.mjs), signs in with an admin token, sees a connector active, sees it
go inactive once the test stops it, and the test reads the expected text IN the screenshot
with Debian's tesseract OCR (what an admin would see, not only what the DOM holds)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess

from components import NODE_DIR, needs, require
from test_admin_api import admin_service, admin_url, create_admin_token, token_text

CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM")
NODE = shutil.which("node")
CONNECTOR_NAME = "warehouse"

pytestmark = needs("node", "tesseract", *([] if CHROMIUM else ["chromium"]), node_modules=["playwright-core"])


def read_event(proc: subprocess.Popen) -> dict:
    """The next JSON line admin_status.mjs prints; fails with its stderr when it ended instead."""
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"admin_status.mjs ended early (rc {proc.wait()}): {proc.stderr.read()[-3000:]}")
    return json.loads(line)


def ocr_text(png) -> str:
    """What tesseract reads in the image, lower-cased, whitespace collapsed."""
    result = subprocess.run([require("tesseract"), str(png), "stdout"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return re.sub(r"\s+", " ", result.stdout).lower()


def test_chromium_signs_in_and_sees_a_stopped_connector_go_inactive(gw, tmp_path):
    """Chromium is sent to the sign-in form, signs in with an admin token, sees the connector active;
    the connector is stopped and the self-reloading page shows it inactive; the screenshot, read by
    OCR, shows the page's heading, the connector's name and its inactive state."""
    svc = admin_service(gw, page_refresh=1)
    conn = gw.connector(svc, name=CONNECTOR_NAME)
    _, token_path = create_admin_token(gw, svc, name="browser")
    shot = tmp_path / "status.png"
    scenario = {"chromium": CHROMIUM or require("chromium"), "url": admin_url(svc) + "/",
                "token": token_text(token_path), "connector_id": conn.connector_id, "screenshot": str(shot),
                "ignore_certificate_errors": True}
    proc = subprocess.Popen([NODE, str(NODE_DIR / "admin_status.mjs")], cwd=NODE_DIR, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        proc.stdin.write(json.dumps(scenario) + "\n")
        proc.stdin.flush()
        event = read_event(proc)
        assert event.get("event") == "active", event
        conn.stop()
        proc.stdin.write("stopped\n")
        proc.stdin.flush()
        seen = read_event(proc)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert seen["ok"], seen
    assert seen["first_page"] == "/signin" and seen["first_title"] == "Gateway sign-in"
    assert seen["signed_in_title"] == "Gateway status"
    session = next(c for c in seen["cookies"] if c["name"] == "gateway_admin_session")
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    assert CONNECTOR_NAME in seen["active_row"] and "active" in seen["active_row"]
    assert "inactive" in seen["inactive_row"]
    assert seen["scripts"] == 0
    text = ocr_text(shot)
    assert "gateway status" in text, text
    assert CONNECTOR_NAME in text, text
    # The row as seen: the name, then its state in the next cell (OCR may read the border as "|").
    assert re.search(rf"{CONNECTOR_NAME}\W{{0,4}}inactive", text), text
    assert "recent admin events" in text, text
    gw.assert_no_secret_in_logs()
