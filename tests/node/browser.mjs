// A real browser through the gateway, for tests/integration/test_browser.py: Debian's chromium,
// headless, driven by playwright-core (no browser is ever downloaded).
//
//   node browser.mjs < SCENARIO.json
//
// The scenario comes on stdin (it holds the test user's password; nothing secret goes on a command
// line): {"chromium": "/usr/bin/chromium", "host_rules": "MAP *.apps.example.test 127.0.0.1, ...",
//          "start": URL the user types, "app": the app's external URL (ends in "/"),
//          "issuer": the OpenID provider's URL, "login": ..., "password": ...,
//          "redirect_path": a path of the app that redirects to its internal URL,
//          "messages": how many WebSocket messages, "interval_ms": the pause between two,
//          "ignore_certificate_errors": true for a test CA, "extra_args": more Chromium switches, e.g.
//          ["--log-net-log=/tmp/netlog.json", "--net-log-capture-mode=Everything"] to see every byte}
//
// It signs in through the provider's login and consent pages, opens the app (whose page keeps a
// WebSocket to the app's /ws), sends the messages one by one while a second tab follows the
// redirecting path, then signs out and visits the app again. It asserts nothing: it prints one JSON
// document of what the browser saw ({"ok": false, "error": ...} at the first step that failed) and
// the Python test judges it.

import { readFileSync } from 'node:fs';

import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS, passProvider as passProviderPages } from './provider_pages.mjs';

const scenario = JSON.parse(readFileSync(0, 'utf8'));
const seen = { ok: false, steps: [], failed_requests: [] };

function at(url) {
  return url.startsWith(scenario.issuer) ? 'provider' : url.startsWith(scenario.app) ? 'app' : 'elsewhere';
}

// Every hop of the navigation that produced `response`: [{url, status, location}], first hop first.
async function chain(response) {
  const hops = [];
  let request = response ? response.request() : null;
  while (request) {
    const r = await request.response();
    const location = r ? r.headers().location || null : null;
    hops.unshift({ url: request.url(), status: r ? r.status() : null, location });
    request = request.redirectedFrom();
  }
  return hops;
}

// Login and consent at the provider, until the browser leaves it.
function passProvider(page, pages) {
  return passProviderPages(page, scenario.issuer, scenario.login, scenario.password, pages);
}

async function cookieSummary(context) {
  return (await context.cookies(scenario.app)).map((c) => ({
    name: c.name, path: c.path, secure: c.secure, httpOnly: c.httpOnly, sameSite: c.sameSite,
    session: c.expires === -1,
  }));
}

async function main() {
  const args = [...CHROMIUM_ARGS, `--host-resolver-rules=${scenario.host_rules}`];
  if (scenario.ignore_certificate_errors) args.push('--ignore-certificate-errors');
  args.push(...(scenario.extra_args || []));
  const browser = await chromium.launch({ executablePath: scenario.chromium, args, timeout: 30000 });
  seen.browser = browser.version();
  try {
    const context = await browser.newContext();
    context.setDefaultTimeout(20000);
    const page = await context.newPage();
    const step = async (name, fn, tab = page) => {
      seen.steps.push(name);
      try {
        return await fn();
      } catch (e) {
        const text = await tab.content().catch(() => '');
        seen.page_state = await page.evaluate(() => window.wsState).catch(() => null);
        throw new Error(`${name}: ${e.message.split('\n')[0]} (at ${tab.url()}: ${text.slice(0, 600)})`);
      }
    };
    context.on('requestfailed', (r) => seen.failed_requests.push(`${r.url()}: ${r.failure()?.errorText}`));

    // The page's WebSocket: every frame each way, and whether it closed before we closed it.
    const ws = { urls: [], sent: [], received: [], closed: false };
    seen.websocket = ws;
    page.on('websocket', (socket) => {
      ws.urls.push(socket.url());
      socket.on('framesent', (f) => ws.sent.push(String(f.payload)));
      socket.on('framereceived', (f) => ws.received.push(String(f.payload)));
      socket.on('close', () => { ws.closed = true; });
      socket.on('socketerror', (e) => { ws.error = String(e); });
    });

    // 1. The user opens the app: plain http -> https -> the provider's login page.
    const signin = {};
    await step('open the app', async () => {
      const response = await page.goto(scenario.start, { waitUntil: 'load' });
      signin.hops = await chain(response);
      signin.first_page = page.url();
    });
    // 2. Login and consent, then back on the app, signed in.
    signin.provider_pages = [];
    await step('sign in at the provider', () => passProvider(page, signin.provider_pages));
    await step('see the app page', async () => {
      await page.waitForSelector('#who');
      signin.landed = page.url();
      signin.title = await page.title();
      signin.who = await page.textContent('#who');
    });
    signin.cookies = await cookieSummary(context);
    seen.signin = signin;

    // 3. The page's WebSocket: messages spaced out; meanwhile a second tab follows a redirect.
    const redirect = {};
    const tab = await context.newPage();
    await step('open the WebSocket', () => page.waitForFunction(() => window.wsState && window.wsState.opened === 1));
    const count = scenario.messages;
    const started = Date.now();
    for (let i = 1; i <= count; i += 1) {
      await step(`echo message ${i}`, async () => {
        await page.evaluate((text) => window.wsSend(text), `message ${i} of ${count}`);
        await page.waitForFunction((n) => document.querySelectorAll('#echoes li').length >= n, i);
      });
      if (i === Math.ceil(count / 2)) {
        await step('follow the redirect', async () => {
          const response = await tab.goto(scenario.app + scenario.redirect_path, { waitUntil: 'load' });
          redirect.hops = await chain(response);
          redirect.final = tab.url();
          redirect.text = await tab.textContent('body');
        }, tab);
      }
      if (i < count) await page.waitForTimeout(scenario.interval_ms);
    }
    ws.open_ms = Date.now() - started;
    ws.echoes = await page.$$eval('#echoes li', (items) => items.map((li) => li.textContent));
    ws.state = await page.evaluate(() => ({ ...window.wsState }));
    ws.closed_before_signout = ws.closed;
    seen.redirect = redirect;

    // 4. Sign-out: the gateway's cookie goes, the provider confirms, our signed-out page.
    const signout = {};
    await step('sign out', async () => {
      await tab.goto(scenario.app + '.gateway/signout', { waitUntil: 'load' });
      signout.provider_page = tab.url();
      signout.cookies = await cookieSummary(context);
      const yes = tab.locator('button[name="logout"][value="yes"]');
      if (await yes.count()) {
        await Promise.all([tab.waitForURL((u) => at(u.toString()) === 'app', { waitUntil: 'load' }), yes.click()]);
      }
      signout.final = tab.url();
      signout.text = await tab.textContent('body');
    }, tab);
    // 5. The next visit goes to the provider again, to its login form.
    await step('visit again', async () => {
      await tab.goto(scenario.app, { waitUntil: 'load' });
      signout.next_visit = tab.url();
      signout.next_visit_login_form = (await tab.locator('input[name="login"]').count()) === 1;
    }, tab);
    seen.signout = signout;
    seen.ok = true;
  } finally {
    await browser.close();
  }
}

try {
  await main();
} catch (e) {
  seen.error = e.message;
}
process.stdout.write(`${JSON.stringify(seen)}\n`);
