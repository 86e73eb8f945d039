# shellcheck shell=bash
# Security parts of the test services (issue #8), sourced by tests/services/lib.sh:
#
# - a test CA and server certificate (for 127.0.0.1 and localhost), made with openssl under
#   $VANTAGE_STATE_DIR/tls on first use and renewed when they expire within a day. Nothing here
#   is ever committed: every key is generated on the machine that runs the services;
# - Mosquitto's secure listeners: TLS with a password per identity and an ACL
#   (VANTAGE_MQTT_TLS_PORT), and mutual TLS whose certificate CN is the user name
#   (VANTAGE_MQTT_MTLS_PORT), sharing that ACL;
# - the Kafka SASL_SSL listener (SCRAM-SHA-512, VANTAGE_KAFKA_SASL_PORT) and its user;
# - PostgreSQL's TLS (same port: a client asks for TLS, or not).
#
# Identities on the secure MQTT listeners are added and removed at run time (tests do it per
# run, with their own topic prefix):
#
#   tests/services/lib.sh mqtt-agent PREFIX REGION AGENT   < password   (password on stdin)
#   tests/services/lib.sh mqtt-ingester PREFIX USER        < password
#   tests/services/lib.sh mqtt-remove USER
#   tests/services/lib.sh client-cert NAME                 (prints the cert and key paths)
#
# An agent identity may publish only <prefix>/v1/results/<region>/<agent> and
# <prefix>/v1/status/<region>/<agent>, and read only <prefix>/v1/targets/<region> and
# <prefix>/v1/targets/<region>/<agent>. An ingester identity reads <prefix>/v1/results/# and
# <prefix>/v1/status/#, and writes (and reads back) <prefix>/v1/targets/#. (The default `ingester` identity of the
# secure listeners uses `+` as its prefix: every prefix.)

TLS_DIR=$STATE_DIR/tls
TLS_CHANGED=${TLS_CHANGED:-0}
TLS_CA=$TLS_DIR/ca.pem
TLS_CA_KEY=$TLS_DIR/ca.key
TLS_CERT=$TLS_DIR/server.pem
TLS_KEY=$TLS_DIR/server.key
MQ_SECURE=$MQ_DIR/secure
MQ_SECURE_PASSWD=$MQ_SECURE/passwd
MQ_ACL=$MQ_SECURE/acl
MQ_INGESTER_PW=$MQ_SECURE/ingester.pw
K_SASL_PW=$K_DIR/ingester.pw
K_KEYSTORE=$K_DIR/keystore.p12
# The keystore's password protects a test key that sits next to it; it is not a secret.
K_KEYSTORE_PASSWORD=vantage-test-keystore

# days the test CA and certificates are valid
TLS_DAYS=365

# random_secret: 32 URL-safe random characters
random_secret() { head -c 24 /dev/urandom | base64 | tr '+/' '-_'; }

# write_secret FILE: FILE holds a random secret (kept if it exists)
write_secret() {
  [[ -s $1 ]] && return 0
  (umask 077 && random_secret >"$1")
}

# cert_fresh CERT: exists and is valid for at least one more day
cert_fresh() { [[ -f $1 ]] && openssl x509 -checkend 86400 -noout -in "$1" >/dev/null 2>&1; }

# issue NAME SUBJ EXT: a key and certificate signed by the test CA in $TLS_DIR/NAME.{key,pem}
issue() {
  local name=$1 subj=$2 ext=$3
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$TLS_DIR/$name.key" -out "$TLS_DIR/$name.csr" -subj "$subj" >>"$TLS_DIR/openssl.log" 2>&1 ||
    die "tls: openssl req for $name failed (log: $TLS_DIR/openssl.log)"
  openssl x509 -req -in "$TLS_DIR/$name.csr" -CA "$TLS_CA" -CAkey "$TLS_CA_KEY" -CAcreateserial \
    -days "$TLS_DAYS" -sha256 -extfile <(printf '%s\n' "$ext") -out "$TLS_DIR/$name.pem" \
    >>"$TLS_DIR/openssl.log" 2>&1 || die "tls: signing $name failed (log: $TLS_DIR/openssl.log)"
  rm -f "$TLS_DIR/$name.csr"
  chmod 0600 "$TLS_DIR/$name.key"
  chmod 0644 "$TLS_DIR/$name.pem"
}

# ensure_tls: the test CA and the server certificate exist and are fresh; 0 if they changed
ensure_tls() {
  command -v openssl >/dev/null || apt_install openssl
  mkdir -p "$TLS_DIR" "$TLS_DIR/clients"
  chmod 0755 "$TLS_DIR"
  chmod 0700 "$TLS_DIR/clients"
  local changed=1
  if ! cert_fresh "$TLS_CA" || [[ ! -f $TLS_CA_KEY ]]; then
    log "tls: making a test CA in $TLS_DIR"
    rm -f "$TLS_CERT" "$TLS_DIR/clients/"*
    (umask 077 && openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$TLS_CA_KEY" -out "$TLS_CA" -days "$TLS_DAYS" -sha256 \
      -subj "/CN=vantage test CA $(hostname)" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
      >>"$TLS_DIR/openssl.log" 2>&1) || die "tls: making the CA failed (log: $TLS_DIR/openssl.log)"
    chmod 0644 "$TLS_CA"
  fi
  if ! cert_fresh "$TLS_CERT"; then
    issue server "/CN=localhost" "$(printf '%s\n' \
      'basicConstraints=critical,CA:FALSE' \
      'keyUsage=critical,digitalSignature,keyEncipherment' \
      'extendedKeyUsage=serverAuth' \
      'subjectAltName=DNS:localhost,IP:127.0.0.1')"
  else
    changed=0
  fi
  # PostgreSQL insists on a key owned by its user (or root, mode 0640 with its group).
  mkdir -p "$PG_DIR/tls"
  install -o postgres -g postgres -m 0600 "$TLS_KEY" "$PG_DIR/tls/server.key"
  install -o postgres -g postgres -m 0644 "$TLS_CERT" "$PG_DIR/tls/server.pem"
  return $((1 - changed))
}

# client-cert NAME: a client certificate with CN=NAME (for the mutual-TLS listener)
client_cert() {
  local name=$1
  vantage_name_ok "$name" || die "client-cert: '$name' is not a valid name"
  if ! cert_fresh "$TLS_DIR/clients/$name.pem"; then
    issue "clients/$name" "/CN=$name" "$(printf '%s\n' \
      'basicConstraints=critical,CA:FALSE' \
      'keyUsage=critical,digitalSignature' \
      'extendedKeyUsage=clientAuth')"
  fi
  printf '%s\n%s\n' "$TLS_DIR/clients/$name.pem" "$TLS_DIR/clients/$name.key"
}

# vantage_name_ok NAME: a-z 0-9 - _ ., 1..64 bytes (vantage_proto::is_valid_name)
vantage_name_ok() { [[ $1 =~ ^[a-z0-9._-]{1,64}$ ]]; }

# ---------------------------------------------------------------- Mosquitto identities

# mq_identity USER ACL-LINES PASSWORD: store one identity (hashed password + ACL block)
mq_identity() {
  local user=$1 acl=$2 password=$3 tmp
  mkdir -p "$MQ_SECURE/users"
  chmod 0700 "$MQ_SECURE" "$MQ_SECURE/users"
  tmp=$(mktemp "$MQ_SECURE/users/.pw.XXXXXX")
  mosquitto_passwd -b "$tmp" "$user" "$password" >/dev/null 2>&1 ||
    { rm -f "$tmp"; die "mosquitto: mosquitto_passwd failed for $user"; }
  mv -f "$tmp" "$MQ_SECURE/users/$user.pw"
  printf 'user %s\n%s\n\n' "$user" "$acl" >"$MQ_SECURE/users/$user.acl"
}

# mq_secure_files: passwd and acl from the identities; 0 if either changed
mq_secure_files() {
  mkdir -p "$MQ_SECURE/users"
  chmod 0700 "$MQ_SECURE" "$MQ_SECURE/users"
  write_secret "$MQ_INGESTER_PW"
  if [[ ! -f $MQ_SECURE/users/ingester.pw ]]; then
    mq_identity ingester "$(ingester_acl +)" "$(cat "$MQ_INGESTER_PW")"
  else
    # The ingester's grants follow this script (an instance set up before the ack topics got
    # them at its next `up`); the password stays.
    printf 'user %s\n%s\n\n' ingester "$(ingester_acl +)" >"$MQ_SECURE/users/ingester.acl"
  fi
  local tmp changed=1
  tmp=$(mktemp)
  cat "$MQ_SECURE/users/"*.pw >"$tmp"
  chmod 0600 "$tmp"
  install_if_changed "$tmp" "$MQ_SECURE_PASSWD" || changed=0
  tmp=$(mktemp)
  {
    echo "# Written by tests/services (security.sh) from $MQ_SECURE/users; edit those, not this."
    echo "# Anything not granted here is denied."
    cat "$MQ_SECURE/users/"*.acl
  } >"$tmp"
  chmod 0600 "$tmp"
  install_if_changed "$tmp" "$MQ_ACL" && changed=1
  return $((1 - changed))
}

ingester_acl() {
  printf '%s\n' \
    "topic read $1/v1/results/#" \
    "topic read $1/v1/status/#" \
    "topic readwrite $1/v1/targets/#" \
    "topic write $1/v1/acks/#"
}

agent_acl() {
  local prefix=$1 region=$2 agent=$3
  printf '%s\n' \
    "topic write $prefix/v1/results/$region/$agent" \
    "topic write $prefix/v1/status/$region/$agent" \
    "topic read $prefix/v1/targets/$region" \
    "topic read $prefix/v1/targets/$region/$agent" \
    "topic read $prefix/v1/acks/$region/$agent"
}

# mq_reload: make the running broker read the password file and ACL again
mq_reload() {
  local pid
  pid=$(mq_pid) || die "mosquitto is not running (tests/services/up)"
  kill -HUP "$pid"
}

# read_password: the first line of stdin, which must not be empty
read_password() {
  local pw
  IFS= read -r pw || true
  [[ -n $pw ]] || die "give the password on stdin"
  printf '%s' "$pw"
}

cmd_mqtt_agent() {
  (($# == 3)) || die "usage: lib.sh mqtt-agent PREFIX REGION AGENT < password"
  local prefix=$1 region=$2 agent=$3 pw
  if ! vantage_name_ok "$prefix" || ! vantage_name_ok "$region" || ! vantage_name_ok "$agent"; then
    die "mqtt-agent: prefix, region and agent must be a-z 0-9 - _ . (1..64)"
  fi
  [[ $agent != ingester ]] || die "mqtt-agent: 'ingester' is reserved"
  pw=$(read_password)
  lock_state_dir
  mq_identity "$agent" "$(agent_acl "$prefix" "$region" "$agent")" "$pw"
  mq_secure_files || true
  mq_reload
}

cmd_mqtt_ingester() {
  (($# == 2)) || die "usage: lib.sh mqtt-ingester PREFIX USER < password"
  local prefix=$1 user=$2 pw
  if ! vantage_name_ok "$prefix" || ! vantage_name_ok "$user"; then
    die "mqtt-ingester: bad prefix or user"
  fi
  pw=$(read_password)
  lock_state_dir
  mq_identity "$user" "$(ingester_acl "$prefix")" "$pw"
  mq_secure_files || true
  mq_reload
}

cmd_mqtt_remove() {
  (($# == 1)) || die "usage: lib.sh mqtt-remove USER"
  vantage_name_ok "$1" || die "mqtt-remove: bad user"
  [[ $1 != ingester ]] || die "mqtt-remove: the default ingester identity stays"
  lock_state_dir
  rm -f "$MQ_SECURE/users/$1.pw" "$MQ_SECURE/users/$1.acl"
  mq_secure_files || true
  mq_reload
}

cmd_client_cert() {
  (($# == 1)) || die "usage: lib.sh client-cert NAME"
  lock_state_dir
  client_cert "$1"
}

# ---------------------------------------------------------------- Kafka SASL_SSL

# kafka_keystore: a PKCS#12 keystore with the server certificate for the SASL_SSL listener
kafka_keystore() {
  if [[ -f $K_KEYSTORE && $K_KEYSTORE -nt $TLS_CERT ]]; then return 0; fi
  mkdir -p "$K_DIR"
  openssl pkcs12 -export -in "$TLS_CERT" -inkey "$TLS_KEY" -certfile "$TLS_CA" -name vantage \
    -out "$K_KEYSTORE.tmp" -passout "pass:$K_KEYSTORE_PASSWORD" >>"$TLS_DIR/openssl.log" 2>&1 ||
    die "kafka: making the keystore failed (log: $TLS_DIR/openssl.log)"
  chmod 0600 "$K_KEYSTORE.tmp"
  mv -f "$K_KEYSTORE.tmp" "$K_KEYSTORE"
}

# kafka_scram_users: the SCRAM-SHA-512 user `ingester` exists with the password in $K_SASL_PW.
# Done through the plaintext listener after start, once per data directory and password.
kafka_scram_users() {
  write_secret "$K_SASL_PW"
  local marker=$K_DATA/.vantage-scram spec
  spec=$(sha256sum <"$K_SASL_PW" | cut -d' ' -f1)
  [[ -f $marker && $(cat "$marker") == "$spec" ]] && return 0
  local pw
  pw=$(cat "$K_SASL_PW")
  # ConfigCommand reads SCRAM credentials only from --add-config (its --add-config-file mangles
  # the mechanism name), so this test password is briefly on a local command line.
  if ! kafka_tool org.apache.kafka.tools.ConfigCommand --bootstrap-server "$HOST:$KAFKA_PORT" \
    --command-config "$K_DIR/admin.properties" --alter --entity-type users --entity-name ingester \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=$pw]" >"$K_DIR/scram.log" 2>&1; then
    sed -i "s/$pw/<redacted>/g" "$K_DIR/scram.log"
    fail kafka "$K_DIR/scram.log" "creating the SCRAM user 'ingester' failed"
  fi
  printf '%s\n' "$spec" >"$marker"
  log "kafka: SCRAM-SHA-512 user 'ingester' on the SASL_SSL listener $HOST:$KAFKA_SASL_PORT"
}

# kafka_sasl_ok: the SASL_SSL listener accepts TLS connections
kafka_sasl_ok() {
  timeout 10 openssl s_client -connect "$HOST:$KAFKA_SASL_PORT" -CAfile "$TLS_CA" \
    -verify_return_error </dev/null >/dev/null 2>&1
}

security_env() {
  cat <<EOF
VANTAGE_TLS_CA=$TLS_CA
VANTAGE_MQTT_TLS_PORT=$MQTT_TLS_PORT
VANTAGE_MQTT_MTLS_PORT=$MQTT_MTLS_PORT
VANTAGE_MQTT_TLS_INGESTER_USER=ingester
VANTAGE_MQTT_TLS_INGESTER_PASSWORD_FILE=$MQ_INGESTER_PW
VANTAGE_KAFKA_SASL_PORT=$KAFKA_SASL_PORT
VANTAGE_KAFKA_SASL_BROKERS=$HOST:$KAFKA_SASL_PORT
VANTAGE_KAFKA_SASL_USER=ingester
VANTAGE_KAFKA_SASL_PASSWORD_FILE=$K_SASL_PW
EOF
}
