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
exec "$@"
