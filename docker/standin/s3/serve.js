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
const server = new S3rver({
  directory: args[1],
  address: host || '0.0.0.0',
  port: Number(port || 9000),
  // path-style only: clients reach it by a service name ("minio"), which s3rver would take for a bucket
  vhostBuckets: false,
});
for (const t of server.logger.transports) t.level = 'warn'; // errors and warnings, not a line per request
server.run().then(({ address: a, port: p }) => console.log(`s3 (s3rver) serving ${args[1]} on ${a}:${p}`));
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => server.close().then(() => process.exit(0)));
}
