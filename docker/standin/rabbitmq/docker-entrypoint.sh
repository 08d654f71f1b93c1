#!/bin/sh
# The official image's start-up, reduced to what docker/compose.yaml relies on: the default user and
# password from RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS (created on the first start of an empty node;
# RabbitMQ's own default_user settings), everything else RabbitMQ's defaults.
set -eu
conf=/etc/rabbitmq/conf.d/10-defaults.conf
{
  echo "loopback_users.guest = true"
  echo "listeners.tcp.default = 5672"
  if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then echo "default_user = $RABBITMQ_DEFAULT_USER"; fi
  if [ -n "${RABBITMQ_DEFAULT_PASS:-}" ]; then echo "default_pass = $RABBITMQ_DEFAULT_PASS"; fi
} > "$conf"
chmod 600 "$conf"
# conf.d as mounted, less a setting this RabbitMQ (3.10) does not know and refuses to start with:
# stomp.max_frame_size (docker/rabbitmq/41-stomp-frames.conf) came with 3.12.5
active=/etc/rabbitmq/conf.active.d
mkdir -p "$active"
rm -f "$active"/*.conf
for f in /etc/rabbitmq/conf.d/*.conf; do
  case "${f##*/}" in
    41-stomp-frames.conf) echo "rabbitmq stand-in: $f left out (RabbitMQ 3.10 has no stomp.max_frame_size)";;
    *) cp "$f" "$active/";;
  esac
done
chmod 600 "$active"/*.conf
export RABBITMQ_CONFIG_FILES="$active"
exec "$@"
