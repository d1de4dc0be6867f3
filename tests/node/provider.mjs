// A real OpenID provider for the integration tests: the certified `oidc-provider` package with its
// built-in development interactions (a login form that accepts the users below, then a consent form).
//
//   node provider.mjs CONFIG.json
//
// CONFIG.json: {"issuer": "http://127.0.0.1:PORT", "port": PORT, "keys_file": "...",
//               "clients": [{client_id, client_secret, redirect_uris, post_logout_redirect_uris}],
//               "users": {"alice": {"name": ..., "email": ..., "groups": [...]}}}
//
// The signing keys are read from keys_file (a JWKS with private keys); when it does not exist a new
// RS256 key with a fresh kid is made and written there. A test rotates the keys by stopping the
// provider, removing the file and starting it again. PKCE is required for every client.
// Prints "provider listening on ISSUER" once it accepts connections.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

function signingKeys(path) {
  if (!existsSync(path)) {
    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const jwk = { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };
    writeFileSync(path, JSON.stringify({ keys: [jwk] }), { mode: 0o600 });
  }
  return JSON.parse(readFileSync(path, 'utf8'));
}

const users = config.users;

const provider = new Provider(config.issuer, {
  clients: config.clients.map((c) => ({
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...c,
  })),
  jwks: signingKeys(config.keys_file),
  pkce: { required: () => true },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  // groups travels with the openid scope, as Entra's groups claim does without an extra scope
  claims: {
    openid: ['sub', 'groups'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
  },
  async findAccount(ctx, id) {
    const user = users[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, email_verified: true, ...user };
      },
    };
  },
  features: { devInteractions: { enabled: true }, rpInitiatedLogout: { enabled: true } },
});

provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.on('grant.error', (ctx, err) => console.error('grant.error', err.message, err.error_description || ''));
provider.on('authorization.error', (ctx, err) => console.error('authorization.error', err.message, err.error_description || ''));

provider.listen(config.port, '127.0.0.1', () => {
  console.log(`provider listening on ${config.issuer}`);
});
