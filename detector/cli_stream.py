"""Stream subcommands of ``detector``: worker, produce, tail, lists, topics (thin, over detector.stream)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detector.config import Settings, settings_from_args
from detector.core.errors import ConfigError
from detector.core.lists import KINDS


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``12h``, ``7d``.

    >>> parse_duration("7d"), parse_duration("15m"), parse_duration("90")
    (604800.0, 900.0, 90.0)
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    mult = units.get(t[-1:], None)
    number = t[:-1] if mult else t
    try:
        value = float(number) * (mult or 1)
    except ValueError:
        raise ConfigError(f"--ttl: expected a duration like 90s, 15m, 12h or 7d, got {text!r}") from None
    if value <= 0:
        raise ConfigError(f"--ttl: expected a positive duration, got {text!r}")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    return settings_from_args(args)


def _kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap", dest="kafka_bootstrap", help="Kafka bootstrap (env DETECTOR_KAFKA_BOOTSTRAP)"
    )
    g = p.add_argument_group("Kafka TLS / SASL (the SASL password only from "
                             "DETECTOR_KAFKA_SASL_PASSWORD or DETECTOR_KAFKA_SASL_PASSWORD_FILE)")
    g.add_argument("--security-protocol", dest="kafka_security_protocol",
                   choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"), type=str.upper,
                   help="env DETECTOR_KAFKA_SECURITY_PROTOCOL (default PLAINTEXT)")
    g.add_argument("--sasl-mechanism", dest="kafka_sasl_mechanism", type=str.upper,
                   choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
                   help="env DETECTOR_KAFKA_SASL_MECHANISM")
    g.add_argument("--sasl-username", dest="kafka_sasl_username",
                   help="env DETECTOR_KAFKA_SASL_USERNAME")
    g.add_argument("--ssl-cafile", dest="kafka_ssl_cafile", type=Path,
                   help="CA certificates, PEM (env DETECTOR_KAFKA_SSL_CAFILE; default: system CAs)")
    g.add_argument("--ssl-certfile", dest="kafka_ssl_certfile", type=Path,
                   help="client certificate, PEM (env DETECTOR_KAFKA_SSL_CERTFILE)")
    g.add_argument("--ssl-keyfile", dest="kafka_ssl_keyfile", type=Path,
                   help="client key, PEM (env DETECTOR_KAFKA_SSL_KEYFILE; its password: "
                        "DETECTOR_KAFKA_SSL_KEY_PASSWORD[_FILE])")
    g.add_argument("--no-ssl-check-hostname", dest="kafka_ssl_check_hostname",
                   action="store_const", const=False, default=None,
                   help="do not match the broker's certificate to its host name "
                        "(env DETECTOR_KAFKA_SSL_CHECK_HOSTNAME=false; the chain is still verified)")


def cmd_worker(args: argparse.Namespace) -> int:
    from detector.stream.worker import run_worker

    run_worker(_settings(args))
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from detector.stream import io

    settings = _settings(args)
    t0 = time.perf_counter()
    n = io.produce(settings, args.file, rate=args.rate, key_by_ip=not args.no_ip_key)
    dt = time.perf_counter() - t0
    print(f"produced {n:,} messages to {settings.topic_requests} in {dt:.1f} s", file=sys.stderr)
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from detector.stream import io

    settings = _settings(args)
    for d in io.tail(settings, args.n, follow=not args.no_follow, from_beginning=args.from_beginning):
        if args.full:
            print(json.dumps(d), flush=True)
        else:
            enr = d.get("enrichment") or {}
            print(
                f"{d['request_id']:<24} {d['action']:<8} {'silent' if d['silent'] else '':<6} "
                f"risk={d['risk']:.2f} {enr.get('number_country') or '??'} {enr.get('number_type')} "
                f"{','.join(d['reasons'])}",
                flush=True,
            )
    return 0


def cmd_lists(args: argparse.Namespace) -> int:
    from detector.stream import io

    settings = _settings(args)
    if args.lists_command == "add":
        if args.kind == "budget" and not args.ttl:
            raise ConfigError("lists add ... budget: give --ttl (a spend breaker override must expire, "
                              "e.g. --ttl 1h)")
        ttl = parse_duration(args.ttl) if args.ttl else None
        e = io.lists_add(settings, args.action, args.kind, args.value, reason=args.reason, ttl_s=ttl)
        print(
            f"published {e.key}"
            + (
                f" (expires {time.strftime('%Y-%m-%d %H:%M', time.gmtime(e.expires_at))}Z)"
                if e.expires_at
                else ""
            )
        )
    elif args.lists_command == "remove":
        print(f"removed {io.lists_remove(settings, args.action, args.kind, args.value)}")
    else:
        now = time.time()
        for e in io.lists_show(settings):
            if e.active(now) or args.all:
                exp = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(e.expires_at)) if e.expires_at else "never"
                state = "" if e.active(now) else " (expired)"
                print(
                    f"{e.action:<5} {e.kind:<7} {e.value:<28} {e.source:<8} expires {exp}{state}  {e.reason}"
                )
    return 0


def cmd_queue_state(args: argparse.Namespace) -> int:
    from detector.core.capacity import parse_queue_state
    from detector.keys import dialer_signer
    from detector.stream.capacity import publish_queue_state, queue_state_topic

    settings = _settings(args)
    signer = dialer_signer(settings)
    fields: dict[str, Any] = {
        "dialer_id": args.dialer_id, "ts": time.time() if args.ts is None else args.ts,
        "callbacks_waiting": args.waiting, "agents_available": args.agents,
        "avg_handle_s": args.handle_s}
    if args.serve_within_s is not None:
        fields["serve_within_s"] = args.serve_within_s
    state = parse_queue_state(fields)  # the same checks as the workers': a clear error here
    publish_queue_state(settings, state, signer)
    print(f"published the queue state of {state.dialer_id} to {queue_state_topic(settings)} "
          f"(signed by key {signer.kid})")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from detector.stream import io

    settings = _settings(args)
    created = io.create_topics(settings)
    print("created: " + (", ".join(created) if created else "nothing (all exist)"))
    return 0


def add_commands(sub: Any, add_core_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    w = sub.add_parser("worker", help="run a Faust worker (Kafka in, decisions out)")
    _kafka_flags(w)
    w.add_argument(
        "--web-port", dest="web_port", type=int, help="/metrics and /healthz (env DETECTOR_WEB_PORT)"
    )
    w.add_argument("--web-bind", dest="web_bind",
                   help="address of /metrics and /healthz (env DETECTOR_WEB_BIND, default 127.0.0.1)")
    w.add_argument("--web-host", dest="web_host",
                   help="host other workers reach this one at, for /v1/precheck forwarding "
                        "(env DETECTOR_WEB_HOST, default 127.0.0.1)")
    w.add_argument("--data-dir", dest="data_dir", type=Path, help="worker state dir (env DETECTOR_DATA_DIR)")
    w.add_argument("--partitions", type=int, help="partitions of topics it creates (env DETECTOR_PARTITIONS)")
    w.add_argument("--batch-ms", dest="batch_ms", type=int,
                   help="ms a stage may wait to gather work (env DETECTOR_BATCH_MS, default 30)")
    add_core_flags(w)
    w.set_defaults(func=cmd_worker)

    p = sub.add_parser("produce", help="web-tier stand-in: send JSONL requests (key IP, timestamp ts)")
    p.add_argument("file", type=Path)
    p.add_argument("--no-ip-key", action="store_true",
                   help="send without a key (the worker then re-keys every request by IP: one more hop)")
    p.add_argument(
        "--rate", type=float, default=None, help="requests per second (default: as fast as possible)"
    )
    _kafka_flags(p)
    p.set_defaults(func=cmd_produce)

    t = sub.add_parser("tail", help="dialer stand-in: print decisions")
    t.add_argument("-n", type=int, default=None, help="stop after n decisions")
    t.add_argument("--no-follow", action="store_true", help="read to the current end and stop")
    t.add_argument("--from-beginning", action="store_true")
    t.add_argument("--full", action="store_true", help="print whole decision JSON")
    _kafka_flags(t)
    t.set_defaults(func=cmd_tail)

    lists = sub.add_parser("lists", help="deny/allow lists on the compacted detector-lists topic")
    lsub = lists.add_subparsers(dest="lists_command", required=True)
    add = lsub.add_parser("add", help="publish an entry")
    rem = lsub.add_parser("remove", help="publish a removal")
    for q in (add, rem):
        q.add_argument("action", choices=("deny", "allow"))
        q.add_argument("kind", choices=KINDS,
                       help="surge: under-attack mode for '*', a country or +prefix (deny: on, allow: off); "
                            "budget: a spend breaker of '*', a country or a spend scope's +prefix (allow: "
                            "held closed, allow SCOPE:x3: budgets x3, deny: forced open; needs --ttl)")
        q.add_argument("value")
        _kafka_flags(q)
    add.add_argument("--reason", default="")
    add.add_argument("--ttl", default=None, help="expiry: 90s, 15m, 12h, 7d (default: never)")
    show = lsub.add_parser("show", help="print active entries")
    show.add_argument("--all", action="store_true", help="include expired entries")
    _kafka_flags(show)
    lists.set_defaults(func=cmd_lists)

    qs = sub.add_parser("queue-state", help="dialer side: publish a signed queue state (agent capacity)")
    qsub = qs.add_subparsers(dest="queue_state_command", required=True)
    pub = qsub.add_parser("publish", help="sign (DETECTOR_DIALER_PRIVATE_KEY) and publish one queue "
                                          "state to <app>-queue-state (DETECTOR_TOPIC_QUEUE_STATE)")
    pub.add_argument("--dialer-id", dest="dialer_id", required=True,
                     help="this dialer's id (letters, digits, . _ -): the message key")
    pub.add_argument("--waiting", type=int, required=True, help="callbacks waiting to be dialled")
    pub.add_argument("--agents", type=int, required=True,
                     help="agents staffed on callbacks (busy or idle)")
    pub.add_argument("--handle-s", dest="handle_s", type=float, required=True,
                     help="average handle time of one callback, seconds (talk + wrap-up)")
    pub.add_argument("--serve-within-s", dest="serve_within_s", type=float, default=None,
                     help="the time a waiting callback should be served within (default: the "
                          "policy's [capacity] serve_within_s)")
    pub.add_argument("--ts", type=float, default=None, help="state time, epoch s (default: now)")
    _kafka_flags(pub)
    qs.set_defaults(func=cmd_queue_state)

    tp = sub.add_parser("topics", help="create the detector's topics (idempotent)")
    _kafka_flags(tp)
    tp.add_argument("--partitions", type=int)
    tp.set_defaults(func=cmd_topics)
