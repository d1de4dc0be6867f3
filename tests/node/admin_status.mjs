// The gateway's status page in a real browser, for tests/integration/test_admin_status_browser.py:
// Debian's chromium, headless, driven by playwright-core (no browser is ever downloaded).
//
//   node admin_status.mjs     (the scenario as the first line of stdin, then commands)
//
// The scenario (it holds the admin token: nothing secret goes on a command line):
//   {"chromium": "/usr/bin/chromium", "url": the admin listener's https URL, "token": an admin token,
//    "connector_id": the connector to watch, "screenshot": where to save the PNG,
//    "ignore_certificate_errors": true (the gateway's own CA is not in Chromium's store)}
//
// It opens the page (and must land on the sign-in form), signs in with the token, waits until the
// connector's row says "active" and prints {"event": "active", ...}; the test then stops the
// connector and writes "stopped" on stdin; the page (which reloads itself) must come to say
// "inactive"; a full-page screenshot is taken. It asserts nothing: the last line it prints is one
// JSON document of what the browser saw ({"ok": false, "error": ...} at the first step that failed).

import { createInterface } from 'node:readline';

import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS } from './provider_pages.mjs';

const lines = createInterface({ input: process.stdin });
const queue = [];
const waiting = [];
lines.on('line', (line) => (waiting.length ? waiting.shift()(line) : queue.push(line)));
const nextLine = () => (queue.length ? Promise.resolve(queue.shift()) : new Promise((resolve) => waiting.push(resolve)));

const seen = { ok: false, steps: [] };
const say = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);

async function main(scenario) {
  const args = [...CHROMIUM_ARGS];
  if (scenario.ignore_certificate_errors) args.push('--ignore-certificate-errors');
  const browser = await chromium.launch({ executablePath: scenario.chromium, args, timeout: 30000 });
  seen.browser = browser.version();
  try {
    const context = await browser.newContext({ viewport: { width: 1400, height: 900 }, deviceScaleFactor: 2 });
    context.setDefaultTimeout(30000);
    const page = await context.newPage();
    const step = async (name, fn) => {
      seen.steps.push(name);
      try {
        return await fn();
      } catch (e) {
        const text = await page.content().catch(() => '');
        throw new Error(`${name}: ${e.message.split('\n')[0]} (at ${page.url()}: ${text.slice(0, 600)})`);
      }
    };
    const row = `#connector-${scenario.connector_id}`;

    await step('open the status page', async () => {
      await page.goto(scenario.url, { waitUntil: 'load' });
      seen.first_page = new URL(page.url()).pathname;
      seen.first_title = await page.title();
    });
    await step('sign in', async () => {
      await page.fill('#token', scenario.token);
      await Promise.all([page.waitForURL((u) => new URL(u).pathname === '/', { waitUntil: 'load' }),
        page.click('#signin')]);
      seen.signed_in_title = await page.title();
      seen.cookies = (await context.cookies()).map((c) => ({
        name: c.name, httpOnly: c.httpOnly, secure: c.secure, sameSite: c.sameSite }));
    });
    await step('see the connector active', async () => {
      await page.locator(`${row} td.state-active`).waitFor();
      seen.active_row = await page.locator(row).innerText();
    });
    say({ event: 'active' });
    const command = await nextLine();
    if (command !== 'stopped') throw new Error(`expected "stopped" on stdin, got ${JSON.stringify(command)}`);
    await step('see the connector inactive', async () => {
      // The page reloads itself (<meta http-equiv="refresh">): no script of ours runs in it.
      await page.locator(`${row} td.state-inactive`).waitFor();
      await page.waitForLoadState('load');
      seen.inactive_row = await page.locator(row).innerText();
      seen.scripts = await page.locator('script').count();
    });
    await step('take a screenshot', async () => {
      await page.screenshot({ path: scenario.screenshot, fullPage: true });
    });
    seen.ok = true;
  } finally {
    await browser.close();
  }
}

try {
  await main(JSON.parse(await nextLine()));
} catch (e) {
  seen.error = e.message;
}
say(seen);
lines.close();
process.exit(0);
