#!/usr/bin/env bash
# Run a real, single-node Apache Kafka 4.x broker (KRaft, combined
# broker+controller, loopback only) for integration tests and CI, without
# Docker: the broker jars come from Maven Central through tools/kafka/pom.xml.
#
#   kafka.sh install
#       Ensure Java >= 17, Maven and openssl (apt-get install if absent), copy
#       the broker jars into $KAFKA_CACHE/<version>/lib (once), print that dir.
#   kafka.sh start [--dir D] [--port P] [--controller-port C] [--timeout S]
#                  [--owner-pid PID] [--prop key=value]... [--keep-data]
#                  [--sasl-ssl] [--scram-user NAME=PASSWORD]...
#       Start a broker in the background whose files (server.properties,
#       log4j2.xml, data/, logs/server.log, broker.out, broker.pid) live in D,
#       wait until it answers a metadata request, and print
#       BOOTSTRAP=127.0.0.1:P as the last stdout line.  Free loopback ports
#       are picked when none are given.  With --owner-pid the broker is also
#       stopped as soon as that process exits (so a killed test run leaves
#       no broker behind).  Data is wiped on start unless --keep-data.
#       --sasl-ssl adds a SASL_SSL listener on another free loopback port
#       (SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN; client certificates
#       requested, verified when presented) with a test CA, a broker
#       certificate (SAN IP:127.0.0.1, DNS:localhost) and a client
#       certificate made with openssl in D/tls; each --scram-user is created
#       at format time (kafka-storage format --add-scram) for both SCRAM
#       mechanisms and for PLAIN.  The PLAINTEXT and controller listeners
#       stay on loopback.  It also prints SASL_SSL_BOOTSTRAP=127.0.0.1:S,
#       SSL_CAFILE=, SSL_CLIENT_CERT=, SSL_CLIENT_KEY= (encrypted PKCS#8) and
#       SSL_CLIENT_KEY_PASSWORD_FILE= lines before the BOOTSTRAP line.
#   kafka.sh stop [--dir D] [--clean]
#       SIGTERM, wait, SIGKILL.  --clean also removes D.
#   kafka.sh status [--dir D]
#       Print BOOTSTRAP=... and exit 0 if the broker in D is running, else 1.
#   kafka.sh topics --bootstrap B create NAME PARTITIONS [--compact]
#   kafka.sh topics --bootstrap B list | delete NAME | describe [NAME]
#       Thin wrapper over org.apache.kafka.tools.TopicCommand.
#   kafka.sh log [--dir D] [N]
#       Print the last N (default 60) lines of the broker logs.
#
# Environment:
#   KAFKA_VERSION        Kafka version to fetch (default: the pom's, 4.3.1)
#   KAFKA_CACHE          jar cache root (default ~/.cache/detector-kafka)
#   KAFKA_DIR            default for --dir (default ${TMPDIR:-/tmp}/detector-kafka)
#   KAFKA_START_TIMEOUT  seconds to wait for the broker (default 90)
#   KAFKA_HEAP_OPTS      default "-Xmx512m -Xms256m"
#   KAFKA_JVM_OPTS       extra JVM options
#   KAFKA_LOG_LEVEL      root log level of server.log (default WARN)
#   KAFKA_MAVEN_REPO     Maven local repository (default ~/.m2/repository)
#   KAFKA_PYTHON         python with aiokafka, used for the readiness probe
#                        (default python3; falls back to a Java probe)
#
# Messages go to stderr; stdout carries only results (lib dir, BOOTSTRAP=...).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$SCRIPT_DIR/pom.xml"
DEFAULT_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)"
KAFKA_VERSION="${KAFKA_VERSION:-$DEFAULT_VERSION}"
KAFKA_CACHE="${KAFKA_CACHE:-${HOME:-/root}/.cache/detector-kafka}"
VERSION_DIR="$KAFKA_CACHE/$KAFKA_VERSION"
LIB_DIR="$VERSION_DIR/lib"
DEFAULT_DIR="${KAFKA_DIR:-${TMPDIR:-/tmp}/detector-kafka}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}"
PYTHON="${KAFKA_PYTHON:-python3}"
JAVA=""

log() { printf '[kafka.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- install --

APT_UPDATED=0
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else die "need root (or sudo) to run: $*"
    fi
}
apt_update() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install Java >= 17 and Maven by hand"
    [ "$APT_UPDATED" -eq 1 ] && return 0
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    APT_UPDATED=1
}
apt_install() {
    apt_update
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}
apt_has() { apt-cache show "$1" >/dev/null 2>&1; }

# Major version of a java binary (8 for 1.8.x), or 0.
java_major() {
    local v
    v="$("$1" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)" || true
    case "$v" in
        "") echo 0 ;;
        1.*) echo "$v" | cut -d. -f2 ;;
        *) echo "${v%%[.+-]*}" ;;
    esac
}

find_java() {
    local c
    for c in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java 2>/dev/null || true)" /usr/lib/jvm/*/bin/java; do
        [ -n "$c" ] && [ -x "$c" ] || continue
        if [ "$(java_major "$c")" -ge 17 ] 2>/dev/null; then JAVA="$c"; return 0; fi
    done
    return 1
}

ensure_java() {
    find_java && return 0
    log "no Java >= 17 found; installing one"
    apt_update
    if apt_has openjdk-17-jre-headless; then apt_install openjdk-17-jre-headless
    else apt_install default-jre-headless      # Debian 13+: Java 21
    fi
    hash -r
    find_java || die "installed a JRE but still no Java >= 17"
}

ensure_mvn() {
    command -v mvn >/dev/null 2>&1 && return 0
    log "mvn not found; installing maven"
    apt_install maven
    hash -r
    command -v mvn >/dev/null 2>&1 || die "maven install failed"
}

pom_sum() { { cat "$POM"; echo "$KAFKA_VERSION"; } | sha256sum | cut -c1-16; }

lib_ok() {
    [ -f "$VERSION_DIR/.complete" ] && [ "$(cat "$VERSION_DIR/.complete")" = "$(pom_sum)" ] \
        && compgen -G "$LIB_DIR/kafka_2.13-*.jar" >/dev/null
}

do_install() {
    ensure_java
    # openssl makes the test certificates of `start --sasl-ssl` (and tests/unit use it too).
    command -v openssl >/dev/null 2>&1 || apt_install openssl
    if lib_ok; then echo "$LIB_DIR"; return 0; fi
    mkdir -p "$VERSION_DIR"
    # Serialize concurrent installs of the same version.
    exec 9>"$VERSION_DIR/.lock"
    command -v flock >/dev/null 2>&1 && flock -w 600 9
    if lib_ok; then exec 9>&-; echo "$LIB_DIR"; return 0; fi
    ensure_mvn
    local tmp="$VERSION_DIR/lib.tmp.$$"
    rm -rf "$tmp"
    local args=(-q -B -ntp -Dstyle.color=never -f "$POM" "-Dkafka.version=$KAFKA_VERSION"
                ${KAFKA_MAVEN_REPO:+"-Dmaven.repo.local=$KAFKA_MAVEN_REPO"}
                dependency:copy-dependencies "-DoutputDirectory=$tmp" -DincludeScope=runtime)
    log "fetching Kafka $KAFKA_VERSION jars with Maven into $LIB_DIR"
    # Offline first (everything may already be in ~/.m2), then online.
    local mlog="$VERSION_DIR/mvn.log"
    if ! mvn -o "${args[@]}" >"$mlog" 2>&1; then
        rm -rf "$tmp"
        if ! mvn "${args[@]}" >"$mlog" 2>&1; then
            rm -rf "$tmp"
            tail -n 40 "$mlog" >&2
            die "mvn could not fetch Kafka $KAFKA_VERSION (full log: $mlog)"
        fi
    fi
    compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || die "no kafka_2.13 jar after mvn"
    compgen -G "$tmp/log4j-slf4j*-impl-*.jar" >/dev/null || die "no log4j2 slf4j binding after mvn"
    rm -rf "$LIB_DIR"
    mv "$tmp" "$LIB_DIR"
    pom_sum >"$VERSION_DIR/.complete"
    exec 9>&-   # release the lock (the broker must not inherit it)
    log "installed $(ls "$LIB_DIR" | wc -l) jars"
    echo "$LIB_DIR"
}

# --------------------------------------------------------------- helpers --

free_port() {
    if command -v "$PYTHON" >/dev/null 2>&1; then
        "$PYTHON" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    local p i
    for i in $(seq 1 200); do
        p=$(( 20000 + RANDOM % 40000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    die "no free port found"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# pid of the broker in $DIR if it is alive and really ours
broker_pid() {
    local pf="$1/broker.pid" pid
    [ -f "$pf" ] || return 1
    pid="$(cat "$pf" 2>/dev/null)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
    echo "$pid"
}

log_tail() {
    local dir="$1" n="${2:-60}" f m
    for f in "$dir/logs/server.log" "$dir/broker.out" "$dir/format.log" "$dir/probe.log"; do
        [ -s "$f" ] || continue
        m="$n"; [ "$f" = "$dir/probe.log" ] && m=8
        echo "----- last $m lines of $f -----"
        tail -n "$m" "$f"
    done
}

java_cmd_opts() {
    local dir="$1"
    # shellcheck disable=SC2206
    local heap=($HEAP_OPTS) extra=(${KAFKA_JVM_OPTS:-})
    JOPTS=("${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
           "-Dlog4j2.configurationFile=$dir/log4j2.xml" "-Dkafka.logs.dir=$dir/logs"
           ${extra[@]+"${extra[@]}"} -cp "$LIB_DIR/*")
}

write_log4j2() {
    local dir="$1" level="${KAFKA_LOG_LEVEL:-WARN}"
    cat >"$dir/log4j2.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by tools/kafka/kafka.sh: everything to logs/server.log, nothing
     to stdout.  Root level from KAFKA_LOG_LEVEL (default WARN); startup and
     shutdown milestones at INFO. -->
<Configuration status="WARN" name="detector-kafka" shutdownHook="disable">
  <Appenders>
    <RollingFile name="server" fileName="$dir/logs/server.log"
                 filePattern="$dir/logs/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="50 MB"/></Policies>
      <DefaultRolloverStrategy max="2"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="$level"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.Kafka" level="INFO"/>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Logger name="kafka.server.BrokerServer" level="INFO"/>
    <Logger name="kafka.server.ControllerServer" level="INFO"/>
    <Logger name="kafka.server.SharedServer" level="INFO"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="WARN"/>
  </Loggers>
</Configuration>
EOF
}

# Quiet config for the command line tools (TopicCommand ...): WARN to stderr.
tools_log4j2() {
    local f="$VERSION_DIR/log4j2-tools.xml"
    if [ ! -s "$f" ]; then
        mkdir -p "$VERSION_DIR"
        cat >"$f.$$" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN" name="detector-kafka-tools">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR"><PatternLayout pattern="%p %m (%c)%n"/></Console>
  </Appenders>
  <Loggers><Root level="WARN"><AppenderRef ref="stderr"/></Root></Loggers>
</Configuration>
EOF
        mv "$f.$$" "$f"
    fi
    echo "$f"
}

write_server_props() {
    local dir="$1" port="$2" cport="$3"; shift 3
    local listeners="PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
    local advertised="PLAINTEXT://127.0.0.1:$port"
    local protomap="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    if [ -n "$SASL_PORT" ]; then
        listeners="$listeners,SASL_SSL://127.0.0.1:$SASL_PORT"
        advertised="$advertised,SASL_SSL://127.0.0.1:$SASL_PORT"
        protomap="$protomap,SASL_SSL:SASL_SSL"
    fi
    cat >"$dir/server.properties" <<EOF
# Written by tools/kafka/kafka.sh: single-node KRaft test broker, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=$listeners
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protomap
log.dirs=$dir/data
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=true
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=-1
log.retention.check.interval.ms=300000
EOF
    if [ -n "$SASL_PORT" ]; then write_sasl_ssl_props "$dir" >>"$dir/server.properties"; fi
    local p
    for p in "$@"; do
        printf '%s\n' "$p" >>"$dir/server.properties"
    done
}

# ------------------------------------------------------------ SASL_SSL --

SASL_PORT=""        # set by start --sasl-ssl
SCRAM_USERS=()      # NAME=PASSWORD, from start --scram-user

# A test CA, a broker certificate and a client certificate (key encrypted,
# PKCS#8), all PEM, in $1/tls.  Kafka reads PEM key/trust stores directly.
make_tls() {
    local d="$1/tls"
    command -v openssl >/dev/null 2>&1 || apt_install openssl
    rm -rf "$d"; mkdir -p "$d"; chmod 700 "$d"
    (
        cd "$d"
        openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 7 -subj "/CN=detector test CA" \
            -keyout ca.key -out ca.pem
        openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
            -keyout broker.key -out broker.csr
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' >broker.ext
        openssl x509 -req -sha256 -days 7 -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out broker.pem -extfile broker.ext
        cat broker.key broker.pem ca.pem >broker-keystore.pem
        openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=detector-client" \
            -keyout client-plain.key -out client.csr
        printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' >client.ext
        openssl x509 -req -sha256 -days 7 -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out client.pem -extfile client.ext
        openssl rand -hex 16 >client-key.pass
        openssl pkcs8 -topk8 -v2 aes-256-cbc -in client-plain.key -out client.key \
            -passout file:client-key.pass
        rm -f client-plain.key ./*.csr ./*.ext ca.srl
    ) >"$1/tls.log" 2>&1 || { cat "$1/tls.log" >&2; die "openssl could not make the test certificates"; }
}

write_sasl_ssl_props() {
    local dir="$1" u name pass plain=""
    for u in ${SCRAM_USERS[@]+"${SCRAM_USERS[@]}"}; do
        name="${u%%=*}"; pass="${u#*=}"
        plain="$plain user_$name=\"$pass\""
    done
    cat <<PROPS
# SASL_SSL listener (kafka.sh start --sasl-ssl)
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$plain;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$dir/tls/broker-keystore.pem
listener.name.sasl_ssl.ssl.truststore.type=PEM
listener.name.sasl_ssl.ssl.truststore.location=$dir/tls/ca.pem
listener.name.sasl_ssl.ssl.client.auth=requested
PROPS
}

scram_format_args() {
    local u name pass
    for u in ${SCRAM_USERS[@]+"${SCRAM_USERS[@]}"}; do
        name="${u%%=*}"; pass="${u#*=}"
        printf '%s\0%s\0' --add-scram "SCRAM-SHA-512=[name=$name,password=$pass]"
        printf '%s\0%s\0' --add-scram "SCRAM-SHA-256=[name=$name,password=$pass]"
    done
}

# Exit 0 when the broker at $1 answers a metadata request listing itself.
probe() {
    local bootstrap="$1" dir="$2"
    if [ -z "${PROBE_KIND:-}" ]; then
        if command -v "$PYTHON" >/dev/null 2>&1 && "$PYTHON" -c 'import aiokafka' 2>/dev/null; then
            PROBE_KIND=python
        else
            PROBE_KIND=java
        fi
        log "readiness probe: $PROBE_KIND"
    fi
    if [ "$PROBE_KIND" = python ]; then
        timeout 20 "$PYTHON" - "$bootstrap" >"$dir/probe.log" 2>&1 <<'EOF'
import asyncio, sys
from aiokafka.admin import AIOKafkaAdminClient

async def main(bootstrap):
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        info = await admin.describe_cluster()
        if not info.get("brokers") or info.get("controller_id", -1) < 0:
            print("not ready:", info)
            return 1
        await admin.list_topics()
        return 0
    finally:
        await admin.close()

sys.exit(asyncio.run(main(sys.argv[1])))
EOF
    else
        timeout 30 "$JAVA" -Xmx128m -Dlog4j2.configurationFile="$(tools_log4j2)" \
            -cp "$LIB_DIR/*" org.apache.kafka.tools.TopicCommand \
            --bootstrap-server "$bootstrap" --list >"$dir/probe.log" 2>&1
    fi
}

kill_broker() {
    local dir="$1" pid wpid i
    if [ -f "$dir/watchdog.pid" ]; then
        wpid="$(cat "$dir/watchdog.pid" 2>/dev/null || true)"
        [ -n "$wpid" ] && kill "$wpid" 2>/dev/null || true
        rm -f "$dir/watchdog.pid"
    fi
    pid="$(broker_pid "$dir")" || { rm -f "$dir/broker.pid"; return 0; }
    log "stopping broker pid $pid (SIGTERM)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 "${KAFKA_STOP_TIMEOUT:-30}"); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "broker did not stop in time; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for i in $(seq 1 10); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$dir/broker.pid"
}

# Start the broker process once; returns 0 when ready, 2 on a port clash, 1 otherwise.
start_once() {
    local dir="$1" port="$2" cport="$3"; shift 3
    local bootstrap="127.0.0.1:$port"
    write_server_props "$dir" "$port" "$cport" "$@"
    rm -f "$dir/broker.out" "$dir/probe.log" "$dir/logs/server.log"*

    if [ ! -f "$dir/data/meta.properties" ]; then
        local cid
        cid="$("$JAVA" "${JOPTS[@]}" kafka.tools.StorageTool random-uuid 2>>"$dir/format.log" | tail -n1)"
        [ -n "$cid" ] || { log "StorageTool random-uuid failed"; return 1; }
        echo "$cid" >"$dir/cluster.id"
        local scram=()
        if [ -n "$SASL_PORT" ]; then mapfile -d '' scram < <(scram_format_args); fi
        if ! "$JAVA" "${JOPTS[@]}" kafka.tools.StorageTool format --standalone \
                -t "$cid" -c "$dir/server.properties" ${scram[@]+"${scram[@]}"} \
                >>"$dir/format.log" 2>&1; then
            log "StorageTool format failed"
            return 1
        fi
    fi

    local launcher=(nohup)
    command -v setsid >/dev/null 2>&1 && launcher=(setsid nohup)
    # The inner bash records its own pid and execs java, so broker.pid is
    # the JVM whatever setsid/nohup do with forking.
    "${launcher[@]}" bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$dir/broker.pid" \
        "$JAVA" "${JOPTS[@]}" kafka.Kafka "$dir/server.properties" \
        </dev/null >"$dir/broker.out" 2>&1 &
    local i pid=""
    for i in $(seq 1 50); do
        pid="$(cat "$dir/broker.pid" 2>/dev/null || true)"
        [ -n "$pid" ] && break
        sleep 0.1
    done
    [ -n "$pid" ] || { log "broker did not record its pid"; return 1; }
    echo "$bootstrap" >"$dir/bootstrap"

    local t0=$SECONDS deadline=$(( SECONDS + START_TIMEOUT ))
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "broker process $pid exited during startup"
            if grep -qsi 'Address already in use\|BindException' "$dir/broker.out" "$dir/logs/server.log"; then
                return 2
            fi
            return 1
        fi
        if port_open "$port" && probe "$bootstrap" "$dir"; then
            log "broker ready at $bootstrap after $(( SECONDS - t0 ))s (pid $pid, dir $dir)"
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "broker not ready after ${START_TIMEOUT}s"
            return 1
        fi
        sleep 0.5
    done
}

start_watchdog() {
    local dir="$1" owner="$2" pid
    pid="$(cat "$dir/broker.pid")"
    # Detached loop: stop the broker when the owner process goes away.
    setsid nohup bash -c '
        owner=$1 pid=$2
        while kill -0 "$owner" 2>/dev/null && kill -0 "$pid" 2>/dev/null; do sleep 2; done
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null
            for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 1; done
            kill -KILL "$pid" 2>/dev/null
        fi' _ "$owner" "$pid" </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/watchdog.pid"
}

# -------------------------------------------------------------- commands --

cmd_start() {
    local dir="$DEFAULT_DIR" port="" cport="" owner="" keep=0 props=() sasl=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --dir) dir="$2"; shift 2 ;;
            --port) port="$2"; shift 2 ;;
            --controller-port) cport="$2"; shift 2 ;;
            --timeout) START_TIMEOUT="$2"; shift 2 ;;
            --owner-pid) owner="$2"; shift 2 ;;
            --prop) props+=("$2"); shift 2 ;;
            --keep-data) keep=1; shift ;;
            --sasl-ssl) sasl=1; shift ;;
            --scram-user)
                [[ "$2" =~ ^[A-Za-z0-9_.-]+=[A-Za-z0-9_.-]+$ ]] \
                    || die "--scram-user expects NAME=PASSWORD (letters, digits, _ . -)"
                SCRAM_USERS+=("$2"); shift 2 ;;
            *) die "start: unknown argument $1" ;;
        esac
    done
    do_install >/dev/null
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"

    if broker_pid "$dir" >/dev/null; then
        log "broker already running in $dir"
        echo "BOOTSTRAP=$(cat "$dir/bootstrap")"
        return 0
    fi
    local saved_sasl=""
    if [ "$keep" -eq 1 ] && [ -f "$dir/data/meta.properties" ] && [ -f "$dir/ports" ]; then
        # A standalone KRaft log remembers its controller endpoint: reuse ports.
        read -r sport scport saved_sasl <"$dir/ports"
        port="${port:-$sport}"; cport="${cport:-$scport}"
    else
        rm -rf "$dir/data" "$dir/cluster.id" "$dir/format.log"
    fi
    mkdir -p "$dir/data" "$dir/logs"
    write_log4j2 "$dir"
    java_cmd_opts "$dir"
    if [ "$sasl" -eq 1 ] && { [ ! -f "$dir/tls/ca.pem" ] || [ -z "$saved_sasl" ]; }; then
        make_tls "$dir"
    fi

    local auto=0 attempt rc
    [ -z "$port" ] && [ -z "$cport" ] && auto=1
    for attempt in 1 2 3; do
        [ -n "$port" ] || port="$(free_port)"
        while [ -z "$cport" ] || [ "$cport" = "$port" ]; do cport="$(free_port)"; done
        if [ "$sasl" -eq 1 ]; then
            SASL_PORT="$saved_sasl"
            while [ -z "$SASL_PORT" ] || [ "$SASL_PORT" = "$port" ] || [ "$SASL_PORT" = "$cport" ]; do
                SASL_PORT="$(free_port)"
            done
        fi
        if port_open "$port" || port_open "$cport" || { [ -n "$SASL_PORT" ] && port_open "$SASL_PORT"; }; then
            if [ "$auto" -eq 1 ] && [ "$attempt" -lt 3 ]; then
                log "picked port $port/$cport is taken already; picking others"
                port="" cport="" saved_sasl=""
                continue
            fi
            die "port 127.0.0.1:$port or 127.0.0.1:$cport${SASL_PORT:+ or 127.0.0.1:$SASL_PORT} is already in use"
        fi
        echo "$port $cport $SASL_PORT" >"$dir/ports"
        log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$port (controller $cport), dir $dir"
        rc=0
        start_once "$dir" "$port" "$cport" ${props[@]+"${props[@]}"} || rc=$?
        if [ "$rc" -eq 0 ] && [ -n "$SASL_PORT" ] && ! port_open "$SASL_PORT"; then
            log "SASL_SSL listener 127.0.0.1:$SASL_PORT is not open"
            rc=1
        fi
        if [ "$rc" -eq 0 ]; then
            [ -n "$owner" ] && start_watchdog "$dir" "$owner"
            if [ -n "$SASL_PORT" ]; then
                echo "SASL_SSL_BOOTSTRAP=127.0.0.1:$SASL_PORT"
                echo "SSL_CAFILE=$dir/tls/ca.pem"
                echo "SSL_CLIENT_CERT=$dir/tls/client.pem"
                echo "SSL_CLIENT_KEY=$dir/tls/client.key"
                echo "SSL_CLIENT_KEY_PASSWORD_FILE=$dir/tls/client-key.pass"
            fi
            echo "BOOTSTRAP=127.0.0.1:$port"
            return 0
        fi
        kill_broker "$dir"
        if [ "$rc" -eq 2 ] && [ "$auto" -eq 1 ] && [ "$attempt" -lt 3 ]; then
            log "port clash; retrying with other ports"
            port="" cport="" saved_sasl=""
            rm -rf "$dir/data" "$dir/cluster.id"; mkdir -p "$dir/data"
            continue
        fi
        break
    done
    log_tail "$dir" 60 >&2
    die "Kafka broker failed to start (dir $dir)"
}

cmd_stop() {
    local dir="$DEFAULT_DIR" clean=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --dir) dir="$2"; shift 2 ;;
            --clean) clean=1; shift ;;
            *) die "stop: unknown argument $1" ;;
        esac
    done
    [ -d "$dir" ] || { log "no such dir $dir; nothing to stop"; return 0; }
    kill_broker "$dir"
    if [ "$clean" -eq 1 ]; then
        # Only remove directories that look like ours.
        if [ -f "$dir/server.properties" ] || [ -f "$dir/ports" ] || [ -f "$dir/log4j2.xml" ]; then
            rm -rf "$dir"
            log "removed $dir"
        else
            log "not removing $dir: it does not look like a kafka.sh broker dir"
        fi
    fi
}

cmd_status() {
    local dir="$DEFAULT_DIR"
    [ "${1:-}" = "--dir" ] && dir="$2"
    if pid="$(broker_pid "$dir")"; then
        log "running, pid $pid"
        echo "BOOTSTRAP=$(cat "$dir/bootstrap")"
    else
        log "not running"
        return 1
    fi
}

cmd_log() {
    local dir="$DEFAULT_DIR" n=60
    while [ $# -gt 0 ]; do
        case "$1" in
            --dir) dir="$2"; shift 2 ;;
            *) n="$1"; shift ;;
        esac
    done
    log_tail "$dir" "$n"
}

cmd_topics() {
    local bootstrap=""
    [ "${1:-}" = "--bootstrap" ] || die "usage: topics --bootstrap B create NAME PARTITIONS [--compact] | list | delete NAME | describe [NAME]"
    bootstrap="$2"; shift 2
    do_install >/dev/null
    local tc=("$JAVA" -Xmx256m "-Dlog4j2.configurationFile=$(tools_log4j2)" -cp "$LIB_DIR/*"
              org.apache.kafka.tools.TopicCommand --bootstrap-server "$bootstrap")
    case "${1:-}" in
        create)
            [ $# -ge 3 ] || die "topics create NAME PARTITIONS [--compact]"
            local extra=()
            [ "${4:-}" = "--compact" ] && extra=(--config cleanup.policy=compact)
            "${tc[@]}" --create --if-not-exists --topic "$2" --partitions "$3" \
                --replication-factor 1 ${extra[@]+"${extra[@]}"} ;;
        list) "${tc[@]}" --list ;;
        delete) "${tc[@]}" --delete --topic "$2" ;;
        describe) if [ -n "${2:-}" ]; then "${tc[@]}" --describe --topic "$2"; else "${tc[@]}" --describe; fi ;;
        *) die "topics: unknown action ${1:-}" ;;
    esac
}

main() {
    local cmd="${1:-}"
    [ $# -gt 0 ] && shift
    case "$cmd" in
        install) do_install ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop "$@" ;;
        status) cmd_status "$@" ;;
        log|logs) cmd_log "$@" ;;
        topics) cmd_topics "$@" ;;
        version) echo "$KAFKA_VERSION" ;;
        -h|--help|help|"") sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
        *) die "unknown command $cmd (try --help)" ;;
    esac
}

main "$@"
