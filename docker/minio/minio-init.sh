#!/bin/sh
# minio-init (docker/compose.yaml), at every start: the bucket, and the object store's users, each with a
# policy on the bucket alone: runs (read and write; the runs and the Dask workers) and viewer (read only).
# The root key (MINIO_ROOT_USER) stays MinIO's and this script's.
set -eu
mc alias set em "$1" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "em/$EM_S3_BUCKET"
policy() {  # name, the object actions it allows
  cat > "/tmp/$1.json" <<JSON
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"], "Resource": ["arn:aws:s3:::$EM_S3_BUCKET"]},
  {"Effect": "Allow", "Action": [$2], "Resource": ["arn:aws:s3:::$EM_S3_BUCKET/*"]}]}
JSON
  mc admin policy create em "$1" "/tmp/$1.json" >/dev/null
}
policy em-read-write '"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"'
policy em-read-only '"s3:GetObject"'
user() {  # access key, secret key, policy
  mc admin user add em "$1" "$2" >/dev/null
  if ! mc admin policy attach em "$3" --user "$1" >/tmp/attach.log 2>&1 && ! grep -qi already /tmp/attach.log; then
    cat /tmp/attach.log >&2
    exit 1
  fi
}
user "$EM_S3_RUNS_ACCESS_KEY" "$EM_S3_RUNS_SECRET_KEY" em-read-write
user "$EM_S3_VIEWER_ACCESS_KEY" "$EM_S3_VIEWER_SECRET_KEY" em-read-only
echo "bucket $EM_S3_BUCKET; users: runs (read and write), viewer (read only)"
