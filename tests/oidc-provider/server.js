// A real OpenID Provider for ztgate's SSO tests: npm `oidc-provider`, over HTTPS on 127.0.0.1 with
// an ephemeral port. tests/sso.rs starts it and reads its first stdout line:
//   {"issuer":"https://127.0.0.1:PORT"}
// It exits when its stdin closes (the test process ended).
//
// Environment:
//   OP_TLS_CERT, OP_TLS_KEY   serving certificate chain and key (PEM files)
//   OP_TOKEN_TTL              ID and access token lifetime in seconds (default 300)
//
// Clients: `ztgate-cli` (public, native: PKCE, loopback redirect on any port, device code,
// refresh tokens) is built in; the gateway's confidential client is registered at run time with
// POST /test/clients (its redirect URI holds the gateway's ephemeral port).
// GET /test/stats counts successful token grants by grant type and completed logins.
//
// The only user is alice (password "wonderland"), in group team-a.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { generateKeyPairSync, randomBytes } from 'node:crypto';

import Provider from 'oidc-provider';

const USERS = {
  alice: {
    password: 'wonderland',
    claims: {
      email: 'alice@example.com',
      email_verified: true,
      name: 'Alice Liddell',
      groups: ['team-a'],
    },
  },
};

const ttl = Number.parseInt(process.env.OP_TOKEN_TTL || '300', 10);
const stats = { authorization_code: 0, refresh_token: 0, device_code: 0, logins: 0 };

// In-memory storage that the test can add clients to (the provider's own memory adapter is
// internal).
const store = new Map();
class Adapter {
  constructor(name) {
    this.name = name;
  }

  key(id) {
    return `${this.name}:${id}`;
  }

  async upsert(id, payload) {
    store.set(this.key(id), payload);
    if (payload.userCode) store.set(`${this.name}:userCode:${payload.userCode}`, id);
    if (payload.uid) store.set(`${this.name}:uid:${payload.uid}`, id);
  }

  async find(id) {
    return store.get(this.key(id));
  }

  async findByUserCode(userCode) {
    const id = store.get(`${this.name}:userCode:${userCode}`);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUid(uid) {
    const id = store.get(`${this.name}:uid:${uid}`);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const p = store.get(this.key(id));
    if (p) p.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [k, v] of store) {
      if (v && typeof v === 'object' && v.grantId === grantId) store.delete(k);
    }
  }
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'test-1', use: 'sig', alg: 'RS256' };

const server = createServer({
  cert: readFileSync(process.env.OP_TLS_CERT),
  key: readFileSync(process.env.OP_TLS_KEY),
});

server.listen(0, '127.0.0.1', () => {
  const issuer = `https://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    adapter: Adapter,
    jwks: { keys: [jwk] },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    clients: [
      {
        client_id: 'ztgate-cli',
        client_name: 'ztgate CLI',
        application_type: 'native',
        token_endpoint_auth_method: 'none',
        redirect_uris: ['http://127.0.0.1/callback'],
        grant_types: [
          'authorization_code',
          'refresh_token',
          'urn:ietf:params:oauth:grant-type:device_code',
        ],
        response_types: ['code'],
      },
    ],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name'],
      groups: ['groups'],
    },
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    // Name and groups in the ID token itself: kubectl presents the ID token.
    conformIdTokenClaims: false,
    features: {
      devInteractions: { enabled: false },
      deviceFlow: {
        enabled: true,
        successSource: async (ctx) => {
          ctx.body = '<!DOCTYPE html><html><head><title>Signed in</title></head>'
            + '<body><h1>Signed in</h1><p>Return to your device.</p></body></html>';
        },
      },
    },
    ttl: {
      AccessToken: ttl,
      IdToken: ttl,
      RefreshToken: 24 * 3600,
      DeviceCode: 600,
      Grant: 24 * 3600,
      Interaction: 3600,
      Session: 24 * 3600,
    },
    pkce: { required: () => true },
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    findAccount: async (_ctx, id) => {
      const user = USERS[id];
      if (!user) return undefined;
      return { accountId: id, claims: async () => ({ sub: id, ...user.claims }) };
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  });

  provider.on('grant.success', (ctx) => {
    const t = ctx.oidc.params.grant_type;
    if (t === 'authorization_code') stats.authorization_code += 1;
    else if (t === 'refresh_token') stats.refresh_token += 1;
    else if (t === 'urn:ietf:params:oauth:grant-type:device_code') stats.device_code += 1;
  });

  provider.use(async (ctx, next) => {
    const m = ctx.path.match(/^\/interaction\/([^/]+)$/);
    if (m && ctx.method === 'GET') {
      const details = await provider.interactionDetails(ctx.req, ctx.res);
      if (details.prompt.name === 'consent') {
        // First-party clients: consent is implied.
        const { prompt: { details: missing }, params, session, grantId } = details;
        const grant = grantId
          ? await provider.Grant.find(grantId)
          : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
        if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
        if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
        const to = await provider.interactionResult(ctx.req, ctx.res, {
          consent: { grantId: await grant.save() },
        }, { mergeWithLastSubmission: true });
        ctx.redirect(to);
        return;
      }
      ctx.type = 'html';
      ctx.body = loginPage(m[1], '');
      return;
    }
    if (m && ctx.method === 'POST') {
      await provider.interactionDetails(ctx.req, ctx.res);
      const form = new URLSearchParams(await readBody(ctx.req));
      const login = form.get('login') || '';
      const user = USERS[login];
      if (!user || form.get('password') !== user.password) {
        ctx.status = 401;
        ctx.type = 'html';
        ctx.body = loginPage(m[1], 'Unknown user or wrong password.');
        return;
      }
      stats.logins += 1;
      const to = await provider.interactionResult(ctx.req, ctx.res, {
        login: { accountId: login },
      }, { mergeWithLastSubmission: false });
      ctx.redirect(to);
      return;
    }
    if (ctx.path === '/test/stats' && ctx.method === 'GET') {
      ctx.body = stats;
      return;
    }
    if (ctx.path === '/test/clients' && ctx.method === 'POST') {
      const metadata = JSON.parse(await readBody(ctx.req));
      await new Adapter('Client').upsert(metadata.client_id, metadata);
      ctx.status = 201;
      ctx.body = { ok: true };
      return;
    }
    await next();
  });

  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

process.stdin.on('end', () => process.exit(0));
process.stdin.resume();

function readBody(req) {
  return new Promise((resolve, reject) => {
    let data = '';
    req.setEncoding('utf8');
    req.on('data', (c) => { data += c; });
    req.on('end', () => resolve(data));
    req.on('error', reject);
  });
}

function escape(s) {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function loginPage(uid, error) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Sign in - test identity provider</title>
<style>body{font-family:sans-serif;max-width:24rem;margin:3rem auto}label,input,button{display:block;width:100%;margin:.3rem 0}input,button{padding:.5rem;font-size:1rem}</style>
</head>
<body>
<main>
<h1>Sign in</h1>
${error ? `<p role="alert">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}">
<label for="login">User name</label><input id="login" name="login" autocomplete="username" required>
<label for="password">Password</label><input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit" id="submit">Sign in</button>
</form>
</main>
</body>
</html>`;
}
