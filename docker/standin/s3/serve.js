// MinIO's command line and credentials in front of s3rver: `server DIR --address [HOST]:PORT`,
// MINIO_ROOT_USER / MINIO_ROOT_PASSWORD the only key pair s3rver accepts.
'use strict';
const S3rver = require('s3rver');
const { DUMMY_ACCOUNT } = require('s3rver/lib/models/account');

const args = process.argv.slice(2);
if (args[0] !== 'server' || !args[1]) {
  console.error('usage: server DIR [--address [HOST]:PORT]');
  process.exit(2);
}
const user = process.env.MINIO_ROOT_USER;
const password = process.env.MINIO_ROOT_PASSWORD;
if (!user || !password) {
  console.error('s3: MINIO_ROOT_USER and MINIO_ROOT_PASSWORD must be set');
  process.exit(2);
}
const i = args.indexOf('--address');
const address = i > 0 ? args[i + 1] : ':9000';
const [host, port] = address.includes(':') ? address.split(':') : ['', address];

DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
DUMMY_ACCOUNT.createKeyPair(user, password);
// The store's users (MinIO's are made by minio-init with a policy each): EM_S3_USERS lists
// `key:secret:rw|ro` entries. s3rver has no policies: a read-only key is refused every request but GET and HEAD
// here, before s3rver sees it (its signature is checked by s3rver as for any key).
const readOnly = new Set();
for (const entry of (process.env.EM_S3_USERS || '').split(/\s+/).filter(Boolean)) {
  const [key, secret, mode] = entry.split(':');
  if (!key || !secret || !['rw', 'ro'].includes(mode)) {
    console.error(`s3: EM_S3_USERS entry for ${key || '?'} must be key:secret:rw or key:secret:ro`);
    process.exit(2);
  }
  DUMMY_ACCOUNT.createKeyPair(key, secret);
  if (mode === 'ro') readOnly.add(key);
}
function accessKey(ctx) {
  const auth = ctx.get('authorization');
  const signed = /Credential=([^/,\s]+)/.exec(auth) || /^AWS ([^:]+):/.exec(auth);
  const presigned = ctx.query['X-Amz-Credential'] || ctx.query.AWSAccessKeyId || '';
  return signed ? signed[1] : presigned.split('/')[0];
}
const server = new S3rver({
  directory: args[1],
  address: host || '0.0.0.0',
  port: Number(port || 9000),
  // path-style only: clients reach it by a service name ("minio"), which s3rver would take for a bucket
  vhostBuckets: false,
});
for (const t of server.logger.transports) t.level = 'warn'; // errors and warnings, not a line per request
server.middleware.unshift(async (ctx, next) => {
  if (!['GET', 'HEAD'].includes(ctx.method) && readOnly.has(accessKey(ctx))) {
    ctx.status = 403;
    ctx.type = 'application/xml';
    ctx.body = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>' +
      '<Message>this key may only read</Message></Error>';
    return;
  }
  await next();
});
server.run().then(({ address: a, port: p }) => console.log(`s3 (s3rver) serving ${args[1]} on ${a}:${p}`));
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.close().then(() => process.exit(0)));
}
