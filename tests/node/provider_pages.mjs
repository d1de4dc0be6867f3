// The oidc-provider development interactions, as a user gets through them in a real browser:
// a login form (login and password), then a consent form; both submit with button.login-submit.
// Shared by browser.mjs and login.mjs.

export async function passProvider(page, issuer, login, password, pages) {
  for (let i = 0; i < 5 && page.url().startsWith(issuer); i += 1) {
    const field = page.locator('input[name="login"]');
    if (await field.count()) {
      pages.push('login');
      await field.fill(login);
      await page.locator('input[name="password"]').fill(password);
    } else {
      pages.push('consent');
    }
    const before = page.url();
    await Promise.all([
      page.waitForURL((u) => u.toString() !== before, { waitUntil: 'load' }),
      page.locator('button.login-submit').click(),
    ]);
  }
}

export const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-default-apps', '--no-proxy-server', '--disable-features=HttpsUpgrades'];
