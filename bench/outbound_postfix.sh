#!/usr/bin/env bash
# outbound_postfix.sh - Postfix's relay rate to the same smtp-sink, for comparison with
# bench/outbound.py. Runs a private second Postfix instance (own config and queue in a
# temp dir, smtpd on a loopback port, relayhost = the sink) so the peers' Postfix is
# untouched. Phases mirror outbound.py: inject COUNT messages with smtp-source while
# the smtp transport is deferred, then release and time until the queue is empty.
#
# usage: outbound_postfix.sh SINK_HOST:PORT [COUNT] [SIZE] [SESSIONS]   (run as root)
set -euo pipefail
SINK=${1:?usage: outbound_postfix.sh 127.0.0.1:PORT [COUNT] [SIZE] [SESSIONS]}
COUNT=${2:-2000} SIZE=${3:-2000} SESSIONS=${4:-20}
case $SINK in 127.0.0.1:*) ;; *) echo "refusing non-loopback sink" >&2; exit 2 ;; esac
PORT=${PF2_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
DIR=$(mktemp -d /tmp/mailhost-pf2.XXXXXX)
CONF=$DIR/etc
chmod 755 "$DIR"
mkdir -p "$CONF" "$DIR/spool" "$DIR/data"
chown postfix "$DIR/data"
cp /etc/postfix/main.cf /etc/postfix/master.cf "$CONF/"
# keep only unix services from the stock master.cf, add our own smtpd listener
grep -v '^[^#[:space:]][^[:space:]]*[[:space:]]\+inet[[:space:]]' /etc/postfix/master.cf > "$CONF/master.cf"
echo "127.0.0.1:$PORT inet n - n - - smtpd" >> "$CONF/master.cf"
pc() { postconf -c "$CONF" -e "$@"; }
pc "queue_directory=$DIR/spool" "data_directory=$DIR/data" "inet_interfaces=127.0.0.1" \
   "inet_protocols=ipv4" "mydestination=" "myhostname=pf2.bench.test" \
   "mynetworks=127.0.0.0/8" "relayhost=[${SINK%:*}]:${SINK##*:}" "default_transport=smtp" \
   "relay_transport=smtp" "smtp_tls_security_level=none" "smtpd_tls_security_level=none" \
   "syslog_name=postfix-bench" "maillog_file=$DIR/postfix.log" "maillog_file_prefixes=$DIR" "alias_maps=" \
   "alias_database=" "local_recipient_maps=" "default_process_limit=100" \
   "smtp_destination_concurrency_limit=$SESSIONS" "default_destination_concurrency_limit=$SESSIONS" \
   "defer_transports=smtp" "multi_instance_enable=no" "shlib_directory=$(postconf -h shlib_directory)"
cleanup() { postfix -c "$CONF" stop >/dev/null 2>&1 || true; sleep 1; rm -rf "$DIR"; }
trap cleanup EXIT
postfix -c "$CONF" check >/dev/null 2>&1 || true
postfix -c "$CONF" start || { echo "postfix start failed; see $DIR/postfix.log:" >&2; tail -5 "$DIR/postfix.log" >&2; exit 1; }
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
t0=$(date +%s.%N)
smtp-source -s "$SESSIONS" -m "$COUNT" -l "$SIZE" -f bench@example.org -t sink@bench.test "127.0.0.1:$PORT"
t1=$(date +%s.%N)
count_q() { find "$DIR/spool/deferred" "$DIR/spool/active" "$DIR/spool/incoming" "$DIR/spool/maildrop" -type f 2>/dev/null | wc -l; }
# wait until everything is queued (deferred by defer_transports)
for _ in $(seq 600); do [ "$(find "$DIR/spool/incoming" "$DIR/spool/active" -type f | wc -l)" -eq 0 ] && [ "$(count_q)" -ge "$COUNT" ] && break; sleep 0.1; done
queued=$(count_q)
postconf -c "$CONF" -e "defer_transports="
t2=$(date +%s.%N)
postfix -c "$CONF" reload >/dev/null 2>&1
postqueue -c "$CONF" -f
while [ "$(count_q)" -gt 0 ]; do sleep 0.05; done
t3=$(date +%s.%N)
python3 - "$COUNT" "$t0" "$t1" "$t2" "$t3" "$queued" <<'PY'
import sys
n, t0, t1, t2, t3, q = int(sys.argv[1]), *map(float, sys.argv[2:6]), sys.argv[6]
print(f"peer=postfix count={n} queued={q} enqueue_rate={n/(t1-t0):.1f} relay_rate={n/(t3-t2):.1f} relay_seconds={t3-t2:.2f}")
PY
