#!/usr/bin/env bash
# Test services for vantage: PostgreSQL, Mosquitto 2.x, a single-node KRaft Kafka 4.x and
# Alertmanager, all on 127.0.0.1, all owned by this script (never the system services); it also
# installs Debian's chromium and chromium-driver for the dashboard's browser tests (tests/web.rs)
# and dnsmasq for the dns probe's tests (tests/kinds.rs).
#
#   tests/services/up [--fresh]   install what is missing, start, wait until each answers
#   tests/services/down [--wipe]  stop our three processes (data is kept unless --wipe)
#   tests/services/status         one line per service; exit 0 only if all are up
#   tests/services/lib.sh wipe    stop and delete all service data (keeps the Kafka jars)
#
# Environment (all optional):
#   VANTAGE_STATE_DIR              default /var/tmp/vantage-services
#   VANTAGE_PG_PORT                default 5432
#   VANTAGE_MQTT_PORT              default 1883
#   VANTAGE_KAFKA_PORT             default 9092
#   VANTAGE_KAFKA_CONTROLLER_PORT  default 9093
#   VANTAGE_MQTT_TLS_PORT          MQTT over TLS, password + ACL; default VANTAGE_MQTT_PORT + 16600
#   VANTAGE_MQTT_MTLS_PORT         MQTT over mutual TLS (certificate CN = user) + ACL;
#                                  default VANTAGE_MQTT_PORT + 16700
#   VANTAGE_KAFKA_SASL_PORT        Kafka SASL_SSL (SCRAM-SHA-512); default VANTAGE_KAFKA_PORT + 400
#                                  (the secure ports derive from the base ports so that instances
#                                  with different base ports never collide)
#   VANTAGE_ALERTMANAGER_PORT      Prometheus Alertmanager (API v2), default 9193 (9093, its own
#                                  default, is Kafka's controller port)
#   VANTAGE_ALERTMANAGER_WEBHOOK_PORT  where Alertmanager's receiver posts notifications (served
#                                  by the tests), default VANTAGE_ALERTMANAGER_PORT + 1
#   VANTAGE_KAFKA_TIMEOUT          seconds to wait for Kafka, default 90
#   VANTAGE_KAFKA_HEAP             default "-Xms256m -Xmx512m"
#   KAFKA_HOME                     use the jars of this Kafka distribution ($KAFKA_HOME/libs)
#                                  instead of fetching them from Maven Central
#
# After `up`, $VANTAGE_STATE_DIR/env holds KEY=value lines (VANTAGE_PG_URL,
# VANTAGE_MQTT_HOST, VANTAGE_MQTT_PORT, VANTAGE_KAFKA_BROKERS, VANTAGE_TLS_CA, ...).
# TLS, the secure listeners and their identities: tests/services/security.sh.
set -euo pipefail

SERVICES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE_DIR=$(realpath -m -- "${VANTAGE_STATE_DIR:-/var/tmp/vantage-services}")
HOST=127.0.0.1
PG_PORT=${VANTAGE_PG_PORT:-5432}
MQTT_PORT=${VANTAGE_MQTT_PORT:-1883}
KAFKA_PORT=${VANTAGE_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${VANTAGE_KAFKA_CONTROLLER_PORT:-9093}
MQTT_TLS_PORT=${VANTAGE_MQTT_TLS_PORT:-$((${MQTT_PORT//[^0-9]/0} + 16600))}
MQTT_MTLS_PORT=${VANTAGE_MQTT_MTLS_PORT:-$((${MQTT_PORT//[^0-9]/0} + 16700))}
KAFKA_SASL_PORT=${VANTAGE_KAFKA_SASL_PORT:-$((${KAFKA_PORT//[^0-9]/0} + 400))}
AM_PORT=${VANTAGE_ALERTMANAGER_PORT:-9193}
AM_WEBHOOK_PORT=${VANTAGE_ALERTMANAGER_WEBHOOK_PORT:-$((${AM_PORT//[^0-9]/0} + 1))}
KAFKA_TIMEOUT=${VANTAGE_KAFKA_TIMEOUT:-90}
KAFKA_HEAP=${VANTAGE_KAFKA_HEAP:--Xms256m -Xmx512m}

PG_USER=vantage
PG_PASSWORD=vantage
PG_DB=vantage
PG_URL="postgresql://$PG_USER:$PG_PASSWORD@$HOST:$PG_PORT/$PG_DB"
# user:password pairs for the MQTT broker
MQTT_USERS=(ingester:ingester-secret agent:agent-secret demo-eu:agent-secret demo-us:agent-secret)

PG_DIR=$STATE_DIR/postgres
PG_DATA=$PG_DIR/data
PG_RUN=$PG_DIR/run
PG_LOG=$PG_DIR/postgres.log
MQ_DIR=$STATE_DIR/mosquitto
MQ_CONF=$MQ_DIR/mosquitto.conf
MQ_PASSWD=$MQ_DIR/passwd
MQ_PID=$MQ_DIR/mosquitto.pid
MQ_LOG=$MQ_DIR/mosquitto.log
K_DIR=$STATE_DIR/kafka
K_DATA=$K_DIR/data
K_PROPS=$K_DIR/server.properties
K_PID=$K_DIR/kafka.pid
K_LOG=$K_DIR/kafka.log
K_LIBS=$STATE_DIR/kafka-libs
K_POM=$SERVICES_DIR/kafka/pom.xml
AM_DIR=$STATE_DIR/alertmanager
AM_PID=$AM_DIR/alertmanager.pid
AM_LOG=$AM_DIR/alertmanager.log
AM_BIN=/usr/bin/prometheus-alertmanager
ENV_FILE=$STATE_DIR/env

# shellcheck source=tests/services/security.sh
source "$SERVICES_DIR/security.sh"

export DEBIAN_FRONTEND=noninteractive

# ---------------------------------------------------------------- helpers

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: ERROR: %s\n' "$*" >&2; exit 1; }

# fail SERVICE LOGFILE MESSAGE: name the service, show the tail of its log, exit 1
fail() {
  local service=$1 logfile=$2; shift 2
  printf 'services: ERROR: %s did not come up: %s\n' "$service" "$*" >&2
  if [[ -n $logfile && -f $logfile ]]; then
    printf 'services: --- last 40 lines of %s ---\n' "$logfile" >&2
    tail -n 40 "$logfile" >&2 || true
    printf 'services: --- end of %s ---\n' "$logfile" >&2
  fi
  exit 1
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# describe who listens on PORT (for error messages)
port_owner() {
  if command -v ss >/dev/null 2>&1; then
    ss -H -ltnp "sport = :$1" 2>/dev/null | sed 's/^/    /' || true
  fi
}

# pid_of PIDFILE PATTERN: print the pid if it is alive and its command line matches PATTERN
pid_of() {
  local pidfile=$1 pattern=$2 pid
  [[ -f $pidfile ]] || return 1
  pid=$(head -n1 "$pidfile" 2>/dev/null | tr -dc '0-9')
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pattern" || return 1
  printf '%s\n' "$pid"
}

# wait_gone PID SECONDS: wait until the process is gone; 1 if it is still there
wait_gone() {
  local pid=$1 i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

# stop_pid PIDFILE PID: SIGTERM to one of our services, SIGKILL if it is still there after
# 15 s; forgets PIDFILE (nothing to do without a PID: it was not running)
stop_pid() {
  local pidfile=$1 pid=$2
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  wait_gone "$pid" 15 || { kill -KILL "$pid" 2>/dev/null || true; wait_gone "$pid" 5 || true; }
  rm -f "$pidfile"
}

# stop_logged NAME RUNNING STOP: runs the command STOP if the command RUNNING succeeds, and
# logs which it was
stop_logged() {
  if $2 >/dev/null; then
    $3
    log "$1 stopped"
  else
    log "$1 was not running"
  fi
}

# show_status NAME ADDRESS DETAIL: NAME's line of `status`: up at ADDRESS (with DETAIL) when
# DETAIL is not empty, else down (and 1)
show_status() {
  if [[ -n $3 ]]; then
    printf '%-9s up    %s  %s\n' "$1" "$2" "$3"
    return 0
  fi
  printf '%-9s down  %s\n' "$1" "$2"
  return 1
}

# port_taken NAME PORT HINT: fails NAME's start, naming the process that holds PORT (HINT: the
# setting that picks another port)
port_taken() {
  printf 'services: port %s is held by:\n%s\n' "$2" "$(port_owner "$2")" >&2
  fail "$1" "" "port $HOST:$2 is already in use by a process that is not ours ($3)"
}

# wait_port_free NAME PORT HINT: waits up to 5 s for PORT to be free (a system service that was
# just stopped), else port_taken
wait_port_free() {
  local i
  for ((i = 0; i < 50; i++)); do
    port_open "$2" || return 0
    sleep 0.1
  done
  port_taken "$@"
}

# install_if_changed SRC DEST: move SRC over DEST when they differ; 0 if DEST changed
install_if_changed() {
  if [[ -f $2 ]] && cmp -s "$1" "$2"; then
    rm -f "$1"
    return 1
  fi
  mv -f "$1" "$2"
}

# render TEMPLATE: substitute the @PLACEHOLDERS@ used by the templates in this folder
render() {
  sed -e "s|@STATE_DIR@|$STATE_DIR|g" \
      -e "s|@MQTT_PORT@|$MQTT_PORT|g" \
      -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" \
      -e "s|@KAFKA_CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
      -e "s|@MQTT_TLS_PORT@|$MQTT_TLS_PORT|g" \
      -e "s|@MQTT_MTLS_PORT@|$MQTT_MTLS_PORT|g" \
      -e "s|@KAFKA_SASL_PORT@|$KAFKA_SASL_PORT|g" \
      -e "s|@ALERTMANAGER_WEBHOOK_PORT@|$AM_WEBHOOK_PORT|g" \
      -e "s|@KAFKA_KEYSTORE_PASSWORD@|$K_KEYSTORE_PASSWORD|g" \
      "$1"
}

as_pg() { (cd / && runuser -u postgres -- "$@"); }

check_ports() {
  local name val
  for name in PG_PORT MQTT_PORT KAFKA_PORT KAFKA_CONTROLLER_PORT KAFKA_TIMEOUT MQTT_TLS_PORT \
    MQTT_MTLS_PORT KAFKA_SASL_PORT AM_PORT AM_WEBHOOK_PORT; do
    val=${!name}
    [[ $val =~ ^[0-9]+$ ]] || die "$name must be a number, got '$val'"
  done
}

make_state_dir() {
  mkdir -p "$STATE_DIR"
  chmod 0755 "$STATE_DIR"
}

lock_state_dir() {
  make_state_dir
  exec 9>"$STATE_DIR/.lock"
  if ! flock -w 600 9; then
    die "another tests/services command holds $STATE_DIR/.lock"
  fi
}

# ---------------------------------------------------------------- installation

APT_UPDATED=0
# apt_update_once: `apt-get update` the first time it is needed in this run (a fresh image has
# no package lists at all)
apt_update_once() {
  ((APT_UPDATED)) && return 0
  apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 || die "apt-get update failed (log: $STATE_DIR/apt.log)"
  APT_UPDATED=1
}

# apt_candidate PKG: 0 if apt can install PKG (it has a candidate version)
apt_candidate() {
  local c
  c=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }')
  [[ -n $c && $c != "(none)" ]]
}

# java_major BIN: the major version BIN reports ("17" for 17.0.15, "1" for 1.8.0), empty if it
# does not run
java_major() {
  "$1" -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -n1
}

# find_java: the first Java 17 or newer of $JAVA_HOME, PATH and /usr/lib/jvm (newest first);
# Kafka 4 needs 17. Sets JAVA; 1 if there is none.
JAVA=
find_java() {
  local c m
  local candidates=()
  [[ -n ${JAVA_HOME:-} ]] && candidates+=("$JAVA_HOME/bin/java")
  c=$(command -v java 2>/dev/null) && candidates+=("$c")
  while read -r c; do candidates+=("$c"); done < <(compgen -G '/usr/lib/jvm/*/bin/java' | sort -V -r)
  for c in "${candidates[@]}"; do
    [[ -x $c ]] || continue
    m=$(java_major "$c" || true)
    if [[ $m =~ ^[0-9]+$ ]] && ((m >= 17)); then
      JAVA=$c
      return 0
    fi
  done
  return 1
}

# java_package: the Debian package that brings a Java 17+ runtime here (bookworm: 17, trixie: 21)
java_package() {
  local p
  for p in openjdk-17-jre-headless openjdk-21-jre-headless openjdk-25-jre-headless default-jre-headless; do
    if apt_candidate "$p"; then
      printf '%s\n' "$p"
      return 0
    fi
  done
  die "kafka: no Java 17+ runtime package (openjdk-17/21/25-jre-headless) in the apt sources"
}

apt_install() {
  local apt_log=$STATE_DIR/apt.log rc=0 made_policy=0
  log "installing from Debian: $*"
  # Keep Debian's postinst from starting the system postgres/mosquitto.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  apt_update_once
  apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 "$@" >>"$apt_log" 2>&1 || rc=$?
  if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
  if ((rc != 0)); then
    tail -n 30 "$apt_log" >&2
    die "apt-get install $* failed (full log: $apt_log)"
  fi
}

pg_bin_dir() {
  local want=${1:-} d
  if [[ -n $want ]]; then
    d=/usr/lib/postgresql/$want/bin
    [[ -x $d/postgres ]] && printf '%s\n' "$d"
    return 0
  fi
  # newest installed major version
  while read -r d; do
    if [[ -x $d/postgres && -x $d/initdb && -x $d/psql ]]; then
      printf '%s\n' "$d"
      return 0
    fi
  done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V -r)
}

kafka_home_ok() {
  [[ -n ${KAFKA_HOME:-} ]] && compgen -G "$KAFKA_HOME/libs/kafka_*.jar" >/dev/null
}

kafka_libs_current() {
  [[ -f $K_LIBS/.pom.sha256 ]] &&
    [[ $(cat "$K_LIBS/.pom.sha256") == "$(sha256sum <"$K_POM" | cut -d' ' -f1)" ]]
}

FETCH_PID=
fetch_kafka_libs_start() {
  local tmp=$K_LIBS.tmp
  rm -rf "$tmp"
  log "kafka: collecting jars with Maven (from ~/.m2, else Maven Central): $K_POM -> $K_LIBS"
  # In its own process group, so that fetch_kafka_libs_abort can stop Maven too.
  # shellcheck disable=SC2016 # the positional parameters are the inner shell's
  setsid bash -c 'set -e
    mvn -B -q -f "$3" dependency:copy-dependencies \
      -DoutputDirectory="$1" -Dmdep.overWriteReleases=true >"$2" 2>&1
    sha256sum <"$3" | cut -d" " -f1 >"$1/.pom.sha256"
    rm -rf "$4"
    mv "$1" "$4"' _ "$tmp" "$STATE_DIR/kafka-libs-mvn.log" "$K_POM" "$K_LIBS" </dev/null 9>&- &
  FETCH_PID=$!
}

fetch_kafka_libs_abort() {
  if [[ -n ${FETCH_PID:-} ]]; then
    kill -TERM -- "-$FETCH_PID" 2>/dev/null || kill -TERM "$FETCH_PID" 2>/dev/null || true
    FETCH_PID=
  fi
}

fetch_kafka_libs_wait() {
  [[ -n $FETCH_PID ]] || return 0
  if ! wait "$FETCH_PID"; then
    tail -n 30 "$STATE_DIR/kafka-libs-mvn.log" >&2 || true
    die "kafka: fetching the Kafka jars with Maven failed (log: $STATE_DIR/kafka-libs-mvn.log)"
  fi
  FETCH_PID=
}

ensure_installed() {
  local pkgs=()
  [[ -n $(pg_bin_dir) ]] || pkgs+=(postgresql)
  command -v runuser >/dev/null || pkgs+=(util-linux)
  [[ -x /usr/sbin/mosquitto ]] || pkgs+=(mosquitto)
  if ! command -v mosquitto_sub >/dev/null || ! command -v mosquitto_pub >/dev/null; then
    pkgs+=(mosquitto-clients)
  fi
  # Kafka runs on Java 17 or newer; Maven (below) fetches its jars. Both are Debian packages,
  # so a machine with Rust is enough.
  if ! find_java; then
    apt_update_once
    pkgs+=("$(java_package)")
  fi
  [[ -x $AM_BIN ]] || pkgs+=(prometheus-alertmanager)
  # The dashboard's browser tests (tests/web.rs): Debian's headless Chromium and its WebDriver.
  command -v chromium >/dev/null || pkgs+=(chromium)
  command -v chromedriver >/dev/null || pkgs+=(chromium-driver)
  # Building the ingester: librdkafka's SSL/SASL support links the system OpenSSL (rdkafka `ssl`).
  dpkg -s libssl-dev >/dev/null 2>&1 || pkgs+=(libssl-dev)
  command -v pkg-config >/dev/null || pkgs+=(pkg-config)
  command -v openssl >/dev/null || pkgs+=(openssl)
  # tests/clock.rs runs an agent under libfaketime (a clock hours ahead).
  dpkg -s faketime >/dev/null 2>&1 || pkgs+=(faketime)
  # tests/kinds.rs's dns probes ask a dnsmasq the test starts on loopback (dnsmasq-base: the
  # program without the system service the `dnsmasq` package would enable).
  [[ -x /usr/sbin/dnsmasq ]] || pkgs+=(dnsmasq-base)
  local need_libs=0
  if [[ -n ${KAFKA_HOME:-} ]]; then
    kafka_home_ok || die "kafka: KAFKA_HOME=$KAFKA_HOME has no libs/kafka_*.jar (unset KAFKA_HOME to use the Maven jars)"
  elif ! kafka_libs_current; then
    need_libs=1
    command -v mvn >/dev/null || pkgs+=(maven)
  fi
  # Download the Kafka jars while apt works, when Maven is already there.
  if ((need_libs)) && command -v mvn >/dev/null && [[ -n $JAVA ]]; then
    fetch_kafka_libs_start
    need_libs=0
  fi
  if ((${#pkgs[@]})); then
    apt_install "${pkgs[@]}"
  fi
  if [[ -z $JAVA ]]; then
    find_java || die "kafka: no Java 17 or newer after installing ${pkgs[*]} (set JAVA_HOME to one)"
  fi
  if ((need_libs)); then fetch_kafka_libs_start; fi
  [[ -n $(pg_bin_dir) ]] || die "postgres: no /usr/lib/postgresql/*/bin/postgres after installing postgresql"
}

# ---------------------------------------------------------------- PostgreSQL

PG_BIN=
pg_choose_bin() {
  if [[ -f $PG_DATA/PG_VERSION ]]; then
    local ver
    ver=$(cat "$PG_DATA/PG_VERSION")
    PG_BIN=$(pg_bin_dir "$ver")
    [[ -n $PG_BIN ]] || die "postgres: $PG_DATA was made by PostgreSQL $ver, which is not installed; run 'tests/services/down --wipe' to start over with $(pg_bin_dir)"
  else
    PG_BIN=$(pg_bin_dir)
    [[ -n $PG_BIN ]] || die "postgres: PostgreSQL is not installed"
  fi
}

pg_running() { [[ -n $PG_BIN && -d $PG_DATA ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

pg_answers() {
  "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1 &&
    "$PG_BIN/psql" "$PG_URL" -qAtX -c 'select 1' >/dev/null 2>&1
}

# If a Debian cluster (pg_ctlcluster) listens on our port, stop it.
pg_free_port() {
  port_open "$PG_PORT" || return 0
  if command -v pg_lsclusters >/dev/null 2>&1; then
    local ver name port status
    while read -r ver name port status _; do
      if [[ $port == "$PG_PORT" && $status == online* ]]; then
        log "postgres: stopping Debian's system cluster $ver/$name, which holds port $PG_PORT"
        pg_ctlcluster "$ver" "$name" stop || die "postgres: 'pg_ctlcluster $ver $name stop' failed"
      fi
    done < <(pg_lsclusters -h 2>/dev/null)
  fi
  wait_port_free postgres "$PG_PORT" "set VANTAGE_PG_PORT to use another port"
}

pg_write_config() {
  local changed=0 tmp
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
# Written by tests/services/up on every run; edit tests/services/lib.sh instead.
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$PG_RUN'
max_connections = 200
password_encryption = 'scram-sha-256'
shared_buffers = 128MB
fsync = on
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
# TLS with the test CA's server certificate (tests/services/security.sh); plaintext stays
# allowed for the tests that do not ask for TLS.
ssl = on
ssl_cert_file = '$PG_DIR/tls/server.pem'
ssl_key_file = '$PG_DIR/tls/server.key'
ssl_min_protocol_version = 'TLSv1.2'
EOF
  chown postgres:postgres "$tmp"
  chmod 0600 "$tmp"
  install_if_changed "$tmp" "$PG_DATA/vantage.conf" && changed=1
  if ! grep -q "^include_if_exists = 'vantage.conf'" "$PG_DATA/postgresql.conf"; then
    printf "\n# vantage test services\ninclude_if_exists = 'vantage.conf'\n" >>"$PG_DATA/postgresql.conf"
    changed=1
  fi
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
# Written by tests/services/up on every run; edit tests/services/lib.sh instead.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       postgres            peer
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
EOF
  chown postgres:postgres "$tmp"
  chmod 0600 "$tmp"
  if install_if_changed "$tmp" "$PG_DATA/pg_hba.conf"; then
    PG_HBA_CHANGED=1
  fi
  return $((1 - changed))
}

pg_bootstrap_roles() {
  as_pg "$PG_BIN/psql" -h "$PG_RUN" -p "$PG_PORT" -d postgres -qAtX -v ON_ERROR_STOP=1 >>"$PG_LOG" 2>&1 <<EOF
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER;
  END IF;
END
\$\$;
ALTER ROLE $PG_USER WITH LOGIN CREATEDB SUPERUSER PASSWORD '$PG_PASSWORD';
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB') \gexec
ALTER DATABASE $PG_DB OWNER TO $PG_USER;
EOF
}

up_postgres() {
  pg_choose_bin
  local ver
  ver=$(basename "$(dirname "$PG_BIN")")
  id postgres >/dev/null 2>&1 || die "postgres: there is no 'postgres' OS user (is the postgresql package installed?)"
  mkdir -p "$PG_DIR" "$PG_RUN"
  touch "$PG_LOG"
  chown postgres:postgres "$PG_DIR" "$PG_RUN" "$PG_LOG"
  chmod 0700 "$PG_DIR"
  as_pg test -w "$PG_DIR" ||
    die "postgres: the postgres OS user cannot reach $PG_DIR; choose a VANTAGE_STATE_DIR whose parents are world-traversable"

  if [[ ! -f $PG_DATA/PG_VERSION ]]; then
    rm -rf "$PG_DATA"
    log "postgres: initdb $PG_DATA (PostgreSQL $ver)"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --encoding=UTF8 --no-locale \
      --auth-local=peer --auth-host=scram-sha-256 >"$PG_DIR/initdb.log" 2>&1 ||
      fail postgres "$PG_DIR/initdb.log" "initdb failed"
  fi

  PG_HBA_CHANGED=0
  local conf_changed=0
  pg_write_config && conf_changed=1
  ((TLS_CHANGED)) && conf_changed=1

  if pg_running; then
    if ((conf_changed)); then
      log "postgres: configuration changed, restarting"
      as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 -s stop >>"$PG_LOG" 2>&1 || true
    elif pg_answers; then
      if ((PG_HBA_CHANGED)); then as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -s reload >>"$PG_LOG" 2>&1 || true; fi
      pg_bootstrap_roles || fail postgres "$PG_LOG" "creating role/database '$PG_USER' failed"
      log "postgres up on $HOST:$PG_PORT (already running, PostgreSQL $ver)"
      return 0
    fi
  fi

  if ! pg_running; then
    pg_free_port
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 -s start >/dev/null 2>&1 9>&- ||
      fail postgres "$PG_LOG" "pg_ctl start failed"
  fi

  local i
  for ((i = 0; i < 300; i++)); do
    "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" -t 1 >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" -t 1 >/dev/null 2>&1 ||
    fail postgres "$PG_LOG" "pg_isready -h $HOST -p $PG_PORT did not answer within 30s"
  pg_bootstrap_roles || fail postgres "$PG_LOG" "creating role/database '$PG_USER' failed"
  "$PG_BIN/psql" "$PG_URL" -qAtX -c 'select 1' >/dev/null 2>>"$PG_LOG" ||
    fail postgres "$PG_LOG" "psql $PG_URL -c 'select 1' failed"
  log "postgres up on $HOST:$PG_PORT (PostgreSQL $ver, data $PG_DATA)"
}

# the binaries of the cluster's version (of the newest installed when it has none yet)
pg_bin_of_data() {
  PG_BIN=$(pg_bin_dir "$(cat "$PG_DATA/PG_VERSION" 2>/dev/null || true)")
  [[ -n $PG_BIN ]] || PG_BIN=$(pg_bin_dir)
}

pg_stop() {
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 -s stop >>"$PG_LOG" 2>&1 ||
    die "postgres: pg_ctl stop failed (log: $PG_LOG)"
}

down_postgres() {
  pg_bin_of_data
  stop_logged postgres pg_running pg_stop
}

status_postgres() {
  local up=
  pg_bin_of_data
  [[ -n $PG_BIN ]] && pg_running && pg_answers && up=$PG_URL
  show_status postgres "$HOST:$PG_PORT" "$up"
}

# ---------------------------------------------------------------- Mosquitto

mq_pid() { pid_of "$MQ_PID" mosquitto; }

mq_answers() {
  # shellcheck disable=SC2016 # $SYS is a literal MQTT topic
  timeout 10 mosquitto_sub -h "$HOST" -p "$MQTT_PORT" -u ingester -P ingester-secret \
    -i "vantage-services-probe-$$" -t '$SYS/broker/version' -C 1 -W 5 >/dev/null 2>&1
}

mq_write_passwd() {
  local spec tmp pair
  spec=$(printf '%s\n' "${MQTT_USERS[@]}" | sha256sum | cut -d' ' -f1)
  if [[ -f $MQ_PASSWD && -f $MQ_PASSWD.spec && $(cat "$MQ_PASSWD.spec") == "$spec" ]]; then
    return 1
  fi
  tmp=$MQ_PASSWD.tmp
  rm -f "$tmp"
  (umask 077 && : >"$tmp")
  for pair in "${MQTT_USERS[@]}"; do
    mosquitto_passwd -b "$tmp" "${pair%%:*}" "${pair#*:}" ||
      die "mosquitto: mosquitto_passwd failed for user ${pair%%:*}"
  done
  chmod 0600 "$tmp"
  mv -f "$tmp" "$MQ_PASSWD"
  printf '%s\n' "$spec" >"$MQ_PASSWD.spec"
}

mq_stop() { stop_pid "$MQ_PID" "$(mq_pid)"; }

# If Debian's own mosquitto service holds our port, stop it.
mq_free_port() {
  port_open "$MQTT_PORT" || return 0
  local pid
  for pid in $(pgrep -x mosquitto 2>/dev/null || true); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- '/etc/mosquitto/mosquitto.conf'; then
      log "mosquitto: stopping Debian's system mosquitto (pid $pid), which holds port $MQTT_PORT"
      kill -TERM "$pid" 2>/dev/null || true
      wait_gone "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  wait_port_free mosquitto "$MQTT_PORT" "set VANTAGE_MQTT_PORT to use another port"
}

up_mosquitto() {
  mkdir -p "$MQ_DIR/data"
  chmod 0700 "$MQ_DIR" "$MQ_DIR/data"
  local passwd_changed=0 conf_changed=0 tmp pid
  mq_write_passwd && passwd_changed=1
  mq_secure_files && passwd_changed=1
  ((TLS_CHANGED)) && conf_changed=1
  tmp=$(mktemp)
  render "$SERVICES_DIR/mosquitto.conf" >"$tmp"
  chmod 0600 "$tmp"
  install_if_changed "$tmp" "$MQ_CONF" && conf_changed=1

  if pid=$(mq_pid); then
    if ((conf_changed)); then
      log "mosquitto: configuration changed, restarting"
      mq_stop
    else
      if ((passwd_changed)); then kill -HUP "$pid" 2>/dev/null || true; sleep 0.3; fi
      if mq_answers; then
        log "mosquitto up on $HOST:$MQTT_PORT (already running, pid $pid)"
        return 0
      fi
      log "mosquitto: pid $pid does not answer, restarting"
      mq_stop
    fi
  fi
  rm -f "$MQ_PID"
  mq_free_port
  # 9>&-: the daemon must not inherit the lock on $STATE_DIR/.lock
  (cd / && /usr/sbin/mosquitto -c "$MQ_CONF" -d) >>"$MQ_LOG" 2>&1 9>&- ||
    fail mosquitto "$MQ_LOG" "/usr/sbin/mosquitto -c $MQ_CONF -d failed"
  local i
  for ((i = 0; i < 100; i++)); do
    port_open "$MQTT_PORT" && break
    sleep 0.1
  done
  port_open "$MQTT_PORT" || fail mosquitto "$MQ_LOG" "nothing listens on $HOST:$MQTT_PORT after 10s"
  mq_answers || fail mosquitto "$MQ_LOG" "mosquitto_sub -u ingester on $HOST:$MQTT_PORT got no \$SYS/broker/version"
  pid=$(mq_pid) || fail mosquitto "$MQ_LOG" "no live process in $MQ_PID"
  log "mosquitto up on $HOST:$MQTT_PORT (pid $pid, $(/usr/sbin/mosquitto -h 2>/dev/null | head -n1 | sed 's/ is an MQTT.*//'))"
}

down_mosquitto() { stop_logged mosquitto mq_pid mq_stop; }

status_mosquitto() {
  local pid up=
  pid=$(mq_pid) && command -v mosquitto_sub >/dev/null && mq_answers && up="pid $pid"
  show_status mosquitto "$HOST:$MQTT_PORT" "$up"
}

# ---------------------------------------------------------------- Kafka

kafka_cp() {
  if kafka_home_ok; then
    printf '%s\n' "$KAFKA_HOME/libs/*"
  else
    printf '%s\n' "$K_LIBS/*"
  fi
}

kafka_pid() { pid_of "$K_PID" 'kafka\.Kafka'; }

# kafka_api_ok: the broker answers an ApiVersions request (fast; no JVM)
kafka_api_ok() {
  if ! command -v python3 >/dev/null 2>&1; then
    port_open "$KAFKA_PORT"
    return
  fi
  python3 - "$HOST" "$KAFKA_PORT" <<'EOF' 2>/dev/null
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
cid = b"vantage-services-probe"
body = struct.pack(">hhih", 18, 0, 4242, len(cid)) + cid  # ApiVersions v0
s.sendall(struct.pack(">i", len(body)) + body)
def read(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            sys.exit(1)
        buf += chunk
    return buf
(size,) = struct.unpack(">i", read(4))
corr, err = struct.unpack(">ih", read(size)[:6])
sys.exit(0 if corr == 4242 and err == 0 else 1)
EOF
}

kafka_tool() {
  [[ -n $JAVA ]] || find_java || die "kafka: no Java 17 or newer (tests/services/up installs one)"
  "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$SERVICES_DIR/kafka/tools-log4j2.properties" \
    -cp "$(kafka_cp)" "$@"
}

# kafka_create_ok: an admin client can create a topic (the broker and controller work)
kafka_create_ok() {
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$KAFKA_PORT" \
    --command-config "$K_DIR/admin.properties" \
    --create --if-not-exists --topic vantage-services-healthcheck \
    --partitions 1 --replication-factor 1 >>"$K_DIR/healthcheck.log" 2>&1
}

kafka_stop_begin() {
  local pid
  pid=$(kafka_pid) || return 1
  kill -TERM "$pid" 2>/dev/null || true
  printf '%s\n' "$pid"
}

kafka_stop_finish() {
  local pid=$1
  if ! wait_gone "$pid" 60; then
    log "kafka: pid $pid ignored SIGTERM for 60s, killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 5 || true
  fi
  rm -f "$K_PID"
}

kafka_free_port() {
  local port
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SASL_PORT"; do
    if port_open "$port"; then
      port_taken kafka "$port" "set VANTAGE_KAFKA_PORT / VANTAGE_KAFKA_CONTROLLER_PORT"
    fi
  done
}

KAFKA_STARTED=0
# Start Kafka without waiting for it (see wait_kafka), so that it boots while
# PostgreSQL and Mosquitto start.
start_kafka() {
  fetch_kafka_libs_wait
  [[ -n $JAVA ]] || find_java || die "kafka: no Java 17 or newer (tests/services/up installs one)"
  mkdir -p "$K_DATA"
  local tmp conf_changed=0 pid
  tmp=$(mktemp)
  render "$SERVICES_DIR/kafka/server.properties" >"$tmp"
  chmod 0644 "$tmp"
  install_if_changed "$tmp" "$K_PROPS" && conf_changed=1
  # The JVM options and classpath count as configuration too.
  tmp=$(mktemp)
  printf '%s\n' "$KAFKA_HEAP" "$(kafka_cp)" >"$tmp"
  chmod 0644 "$tmp"
  install_if_changed "$tmp" "$K_DIR/launch" && conf_changed=1
  kafka_keystore
  ((TLS_CHANGED)) && conf_changed=1
  cp -f "$SERVICES_DIR/kafka/log4j2.properties" "$K_DIR/log4j2.properties"
  printf 'request.timeout.ms=5000\ndefault.api.timeout.ms=10000\n' >"$K_DIR/admin.properties"

  if pid=$(kafka_pid); then
    if ((conf_changed)); then
      log "kafka: configuration changed, restarting"
      kafka_stop_finish "$(kafka_stop_begin)"
    else
      return 0
    fi
  fi
  rm -f "$K_PID"
  kafka_free_port

  if [[ ! -f $K_DATA/meta.properties ]]; then
    local cid
    cid=$(cat "$K_DIR/cluster.id" 2>/dev/null || true)
    # Kafka cluster ids are 16 random bytes in URL-safe base64; avoid a leading '-'
    # that the argument parser would take for an option.
    while [[ -z $cid || $cid == -* ]]; do
      cid=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    done
    printf '%s\n' "$cid" >"$K_DIR/cluster.id"
    log "kafka: formatting $K_DATA (cluster id $cid)"
    kafka_tool kafka.tools.StorageTool format -t "$cid" -c "$K_PROPS" --ignore-formatted \
      >"$K_DIR/format.log" 2>&1 || fail kafka "$K_DIR/format.log" "kafka.tools.StorageTool format failed"
  fi

  [[ -f $K_LOG ]] && mv -f "$K_LOG" "$K_LOG.1"
  # setsid: survive the end of the calling shell's process group.
  # shellcheck disable=SC2086,SC2016 # KAFKA_HEAP is a list of JVM options; $$ is the inner shell's
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$K_PID" \
    "$JAVA" $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$K_DIR/log4j2.properties" -Dkafka.logs.dir="$K_DIR" \
    -cp "$(kafka_cp)" kafka.Kafka "$K_PROPS" </dev/null >"$K_LOG" 2>&1 9>&- &
  KAFKA_STARTED=1
}

wait_kafka() {
  local deadline=$((SECONDS + KAFKA_TIMEOUT)) pid=
  if ((KAFKA_STARTED == 0)); then
    # already running before this run: a cheap API-level check is enough
    if pid=$(kafka_pid) && kafka_api_ok; then
      log "kafka up on $HOST:$KAFKA_PORT (already running, pid $pid)"
      kafka_scram_users
      return 0
    fi
    log "kafka: pid ${pid:-?} does not answer, waiting for it"
  fi
  while :; do
    pid=$(kafka_pid) || {
      sleep 0.5 # let the log catch up
      pid=$(kafka_pid) || fail kafka "$K_LOG" "the kafka.Kafka process exited"
    }
    if port_open "$KAFKA_PORT" && kafka_api_ok && kafka_create_ok; then
      break
    fi
    ((SECONDS < deadline)) || fail kafka "$K_LOG" "no answer on $HOST:$KAFKA_PORT within ${KAFKA_TIMEOUT}s (set VANTAGE_KAFKA_TIMEOUT to wait longer)"
    sleep 0.5
  done
  log "kafka up on $HOST:$KAFKA_PORT (pid $pid, Kafka $(kafka_version), controller $HOST:$KAFKA_CONTROLLER_PORT)"
  kafka_scram_users
  kafka_sasl_ok || fail kafka "$K_LOG" "no TLS on the SASL_SSL listener $HOST:$KAFKA_SASL_PORT"
}

kafka_version() {
  local dir jar
  dir=$(kafka_cp)
  dir=${dir%\*}
  for jar in "$dir"kafka_2.13-*.jar; do
    jar=${jar##*/kafka_2.13-}
    printf '%s\n' "${jar%.jar}"
    return 0
  done
}

# kafka_stopped PID: logs the end of a stop that kafka_stop_begin began (PID empty: it was not
# running)
kafka_stopped() {
  if [[ -n $1 ]]; then
    kafka_stop_finish "$1"
    log "kafka stopped"
  else
    log "kafka was not running"
  fi
}

down_kafka() {
  local pid=
  pid=$(kafka_stop_begin) || pid=
  kafka_stopped "$pid"
}

status_kafka() {
  local pid up=
  pid=$(kafka_pid) && kafka_api_ok && up="pid $pid (controller $HOST:$KAFKA_CONTROLLER_PORT)"
  show_status kafka "$HOST:$KAFKA_PORT" "$up"
}

# ---------------------------------------------------------------- Alertmanager
# Debian's prometheus-alertmanager (0.25), on loopback, clustering off, with the repository's
# configuration (tests/services/alertmanager.yml), never the system service.

am_pid() { pid_of "$AM_PID" prometheus-alertmanager; }

# am_answers: GET /-/ready answers 200
am_answers() {
  local line
  { exec 3<>"/dev/tcp/$HOST/$AM_PORT"; } 2>/dev/null || return 1
  printf 'GET /-/ready HTTP/1.0\r\nHost: %s\r\n\r\n' "$HOST:$AM_PORT" >&3
  IFS= read -r -t 5 line <&3 || { exec 3<&-; return 1; }
  exec 3<&-
  [[ $line == "HTTP/1."?" 200"* ]]
}

am_stop() { stop_pid "$AM_PID" "$(am_pid)"; }

up_alertmanager() {
  mkdir -p "$AM_DIR/data"
  local tmp conf_changed=0 pid i
  tmp=$(mktemp)
  render "$SERVICES_DIR/alertmanager.yml" >"$tmp"
  chmod 0644 "$tmp"
  install_if_changed "$tmp" "$AM_DIR/alertmanager.yml" && conf_changed=1
  if pid=$(am_pid); then
    if ((conf_changed == 0)) && am_answers; then
      log "alertmanager up on $HOST:$AM_PORT (already running, pid $pid)"
      return 0
    fi
    log "alertmanager: restarting (configuration changed or no answer)"
    am_stop
  fi
  if port_open "$AM_PORT"; then
    port_taken alertmanager "$AM_PORT" "set VANTAGE_ALERTMANAGER_PORT"
  fi
  # --cluster.listen-address= : no gossip (clustering off); setsid: outlive this shell.
  # shellcheck disable=SC2016 # $$ is the inner shell's
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$AM_PID" \
    "$AM_BIN" --config.file="$AM_DIR/alertmanager.yml" --storage.path="$AM_DIR/data" \
    --web.listen-address="$HOST:$AM_PORT" --cluster.listen-address= \
    </dev/null >>"$AM_LOG" 2>&1 9>&- &
  for ((i = 0; i < 150; i++)); do
    am_answers && break
    am_pid >/dev/null || { sleep 0.3; am_pid >/dev/null || fail alertmanager "$AM_LOG" "the process exited"; }
    sleep 0.1
  done
  am_answers || fail alertmanager "$AM_LOG" "no answer on http://$HOST:$AM_PORT/-/ready within 15s"
  log "alertmanager up on $HOST:$AM_PORT (pid $(am_pid), receiver http://$HOST:$AM_WEBHOOK_PORT/alertmanager)"
}

down_alertmanager() { stop_logged alertmanager am_pid am_stop; }

status_alertmanager() {
  local pid up=
  pid=$(am_pid) && am_answers && up="pid $pid"
  show_status alertmanager "$HOST:$AM_PORT" "$up"
}

# ---------------------------------------------------------------- commands

# Before anything is started: make sure no foreign process holds a port that
# one of our stopped services needs, so a conflict does not leave the others
# half started.
preflight() {
  id postgres >/dev/null 2>&1 || die "postgres: there is no 'postgres' OS user (is the postgresql package installed?)"
  as_pg test -x "$STATE_DIR" ||
    die "postgres: the postgres OS user cannot reach $STATE_DIR; choose a VANTAGE_STATE_DIR whose parents are world-traversable"
  pg_choose_bin
  pg_running || pg_free_port
  mq_pid >/dev/null || mq_free_port
  kafka_pid >/dev/null || kafka_free_port
}

write_env_file() {
  local tmp
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
VANTAGE_STATE_DIR=$STATE_DIR
VANTAGE_PG_URL=$PG_URL
VANTAGE_PG_HOST=$HOST
VANTAGE_PG_PORT=$PG_PORT
VANTAGE_MQTT_HOST=$HOST
VANTAGE_MQTT_PORT=$MQTT_PORT
VANTAGE_MQTT_INGESTER_USER=ingester
VANTAGE_MQTT_INGESTER_PASSWORD=ingester-secret
VANTAGE_MQTT_AGENT_USER=agent
VANTAGE_MQTT_AGENT_PASSWORD=agent-secret
VANTAGE_KAFKA_BROKERS=$HOST:$KAFKA_PORT
VANTAGE_ALERTMANAGER_PORT=$AM_PORT
VANTAGE_ALERTMANAGER_URL=http://$HOST:$AM_PORT
VANTAGE_ALERTMANAGER_WEBHOOK_PORT=$AM_WEBHOOK_PORT
$(security_env)
EOF
  chmod 0644 "$tmp"
  mv -f "$tmp" "$ENV_FILE"
}

wipe_data() {
  log "wiping service data under $STATE_DIR (the Kafka jars in $K_LIBS are kept)"
  rm -rf "$PG_DIR" "$MQ_DIR" "$K_DIR" "$AM_DIR" "$TLS_DIR" "$ENV_FILE"
}

cmd_up() {
  local fresh=0 arg t0=$SECONDS
  for arg in "$@"; do
    case $arg in
      --fresh) fresh=1 ;;
      *) die "usage: tests/services/up [--fresh]" ;;
    esac
  done
  [[ $(id -u) == 0 ]] || die "tests/services/up must run as root (it installs packages and runs postgres via runuser)"
  check_ports
  lock_state_dir
  trap fetch_kafka_libs_abort EXIT
  if ((fresh)); then
    down_all
    wipe_data
  fi
  ensure_installed
  TLS_CHANGED=0
  ensure_tls && TLS_CHANGED=1
  preflight
  start_kafka
  up_postgres
  up_mosquitto
  wait_kafka
  up_alertmanager
  write_env_file
  log "all up in $((SECONDS - t0))s; settings in $ENV_FILE"
}

down_all() {
  local kpid=
  kpid=$(kafka_stop_begin) || kpid=
  down_alertmanager
  down_mosquitto
  down_postgres
  kafka_stopped "$kpid"
}

cmd_down() {
  local wipe=0 arg
  for arg in "$@"; do
    case $arg in
      --wipe) wipe=1 ;;
      *) die "usage: tests/services/down [--wipe]" ;;
    esac
  done
  check_ports
  lock_state_dir
  down_all
  if ((wipe)); then wipe_data; fi
}

cmd_status() {
  local rc=0
  status_postgres || rc=1
  status_mosquitto || rc=1
  status_kafka || rc=1
  status_alertmanager || rc=1
  return $rc
}

main() {
  local cmd=${1:-}
  [[ $# -gt 0 ]] && shift
  case $cmd in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    wipe | reset) cmd_down --wipe ;;
    mqtt-agent) cmd_mqtt_agent "$@" ;;
    mqtt-ingester) cmd_mqtt_ingester "$@" ;;
    mqtt-remove) cmd_mqtt_remove "$@" ;;
    client-cert) cmd_client_cert "$@" ;;
    *)
      echo "usage: tests/services/{up [--fresh] | down [--wipe] | status}" >&2
      echo "   or: tests/services/lib.sh {up|down|status|wipe}" >&2
      exit 2
      ;;
  esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
