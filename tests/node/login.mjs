// `gateway login` in a real browser, for tests/integration/test_access_login.py: the test sets
// BROWSER to `node login.mjs %s`, so Python's webbrowser module starts this with the sign-in URL.
//
// The scenario comes from the file GATEWAY_TEST_LOGIN_SCENARIO names (it holds the test user's
// password; nothing secret goes on a command line): {"chromium": path, "issuer": URL, "login",
// "password", "report": file to write}. Headless Chromium opens the URL, gets through the
// provider's login and consent pages, follows the redirect to the loopback client and records
// what it saw there. It asserts nothing; the Python test judges the report.

import { readFileSync, writeFileSync } from 'node:fs';

import { chromium } from 'playwright-core';

import { CHROMIUM_ARGS, passProvider } from './provider_pages.mjs';

const scenario = JSON.parse(readFileSync(process.env.GATEWAY_TEST_LOGIN_SCENARIO, 'utf8'));
const seen = { ok: false, provider_pages: [] };

async function main() {
  const browser = await chromium.launch({ executablePath: scenario.chromium, args: CHROMIUM_ARGS, timeout: 30000 });
  try {
    const page = await browser.newPage();
    await page.goto(process.argv[2], { waitUntil: 'load' });
    await passProvider(page, scenario.issuer, scenario.login, scenario.password, seen.provider_pages);
    await page.waitForURL((u) => u.toString().startsWith('http://127.0.0.1:'), { waitUntil: 'load', timeout: 20000 });
    const url = new URL(page.url());
    seen.landed = `${url.origin}${url.pathname}`;   // the code stays out of the report
    seen.text = await page.locator('body').innerText();
    seen.ok = true;
  } catch (e) {
    seen.error = String(e);
  } finally {
    await browser.close();
  }
}

await main();
writeFileSync(scenario.report, JSON.stringify(seen));
