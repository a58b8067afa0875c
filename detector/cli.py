"""``detector``: the command line. Every flag also has a ``DETECTOR_*`` environment variable.

Subcommands: demo, replay, simulate, train, evaluate, worker, produce, tail, lists, sink, explain,
backtest.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detector.config import Settings, load_settings, settings_from_args
from detector.core.errors import ConfigError, DetectorError

log = logging.getLogger("detector")


def _settings(args: argparse.Namespace) -> Settings:
    return settings_from_args(args)


def _add_core_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy and data (env DETECTOR_POLICY, DETECTOR_LISTS_FILE, ...)")
    g.add_argument("--policy", type=Path, help="policy TOML (env DETECTOR_POLICY)")
    g.add_argument(
        "--lists-file",
        dest="lists_file",
        type=Path,
        help="JSONL deny/allow entries (env DETECTOR_LISTS_FILE)",
    )
    g.add_argument(
        "--geoip-country-db",
        dest="geoip_country_db",
        type=Path,
        help="country mmdb (env DETECTOR_GEOIP_COUNTRY_DB)",
    )
    g.add_argument(
        "--geoip-asn-db",
        dest="geoip_asn_db",
        type=Path,
        help="ASN mmdb (env DETECTOR_GEOIP_ASN_DB)",
    )
    g.add_argument(
        "--anonymous-ip-db",
        dest="anonymous_ip_db",
        type=Path,
        help="Anonymous-IP mmdb (env DETECTOR_ANONYMOUS_IP_DB)",
    )
    g.add_argument(
        "--hosting-asn-file",
        dest="hosting_asn_file",
        type=Path,
        help="hosting ASNs, one per line (env DETECTOR_HOSTING_ASN_FILE)",
    )
    g.add_argument(
        "--connection-type-db",
        dest="connection_type_db",
        type=Path,
        help="GeoIP2 Connection-Type mmdb, Cellular = carrier NAT (env DETECTOR_CONNECTION_TYPE_DB)",
    )
    g.add_argument(
        "--mobile-asn-file",
        dest="mobile_asn_file",
        type=Path,
        help="mobile carriers' ASNs, one per line (env DETECTOR_MOBILE_ASN_FILE)",
    )
    g.add_argument(
        "--models-dir",
        dest="models_dir",
        type=Path,
        help="model artefacts (env DETECTOR_MODELS_DIR)",
    )
    g.add_argument("--model-name", dest="model_name", help="artefact name (env DETECTOR_MODEL_NAME)")
    g.add_argument("--no-model", action="store_true", help="rules only")


def _context(settings: Settings, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from detector.runtime import build_context, build_model_watcher

    ctx = build_context(settings)
    if not getattr(args, "no_model", False):
        watcher = build_model_watcher(settings)
        if watcher is not None:
            ctx.model = watcher.current()
            shadow = getattr(watcher, "shadow", None)
            ctx.shadow = shadow() if callable(shadow) else None
    return ctx


def cmd_replay(args: argparse.Namespace) -> int:
    import time

    from detector.core.pipeline import Detector
    from detector.replay import replay
    from detector.runtime import build_intel, check_pii_key

    settings = _settings(args)
    check_pii_key(settings, "replay")
    ctx = _context(settings, args)
    det = Detector(ctx, build_intel(settings))
    # Bytes in: a line that is not UTF-8 is a rejected line, not the end of the run.
    src = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
    out = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    rej = sys.stderr if args.rejects is None else open(args.rejects, "w", encoding="utf-8")  # noqa: SIM115
    event_time = None
    if args.check_event_time:
        event_time = (time.time(), settings.max_future_skew_s, settings.max_past_skew_s)
    states = []
    if args.queue_states is not None:
        from detector.replay import load_queue_states

        try:
            data = args.queue_states.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--queue-states: cannot read {str(args.queue_states)!r}: "
                              f"{exc.strerror}") from None
        states = load_queue_states(data.splitlines(), str(args.queue_states))
    try:
        summary = replay(
            src, det, out=out, rejects=rej, progress=sys.stderr.isatty() and out is not sys.stdout,
            event_time=event_time, queue_states=states,
        )
    finally:
        for fh in (src, out, rej):
            if fh not in (sys.stdin.buffer, sys.stdout, sys.stderr):
                fh.close()
    print(summary.render(), file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from detector.demo import run_demo

    settings = _settings(args)
    ctx = _context(settings, args)
    note = f"(policy {ctx.policy.version}, model {ctx.model.version if ctx.model else 'off'})"
    result = run_demo(
        ctx,
        seed=args.seed,
        legit_per_day=args.legit,
        attack_scale=args.attack_scale,
        model_note=note,
        log_db=None if args.no_log else settings.sink_db,
        out_dir=None if args.no_log else Path("var/demo"),
    )
    print(result.text)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from detector.sim import SimConfig, simulate, write_jsonl
    from detector.sim.simulate import scenario_options, write_campaigns

    try:
        cfg = SimConfig(
            seed=args.seed,
            legit_per_day=args.legit,
            duration_s=args.duration,
            attack_scale=args.attack_scale,
            **scenario_options(args.scenarios, args.volume),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    items = simulate(cfg)
    labels = args.labels or Path(str(args.out).removesuffix(".jsonl") + ".labels.jsonl")
    write_jsonl(items, args.out, labels)
    campaigns = write_campaigns(cfg, Path(str(args.out).removesuffix(".jsonl") + ".campaigns.json"))
    print(f"wrote {len(items):,} requests to {args.out}, labels to {labels} and declared "
          f"campaigns to {campaigns}", file=sys.stderr)  # fmt: skip
    return 0


def _add_scenario_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenarios", default=None,
                   help="comma-separated attacks and legitimate populations to simulate (default: "
                        "all; the base legit day is always there; `all`, `none`)")  # fmt: skip
    p.add_argument("--volume", action="append", default=[], metavar="NAME=N",
                   help="requests per day of one scenario (repeatable)")  # fmt: skip


def cmd_sim_ipdb(args: argparse.Namespace) -> int:
    from detector.sim import build_ip_databases

    args.out.mkdir(parents=True, exist_ok=True)
    paths = build_ip_databases(args.out)
    env = {
        "country": "DETECTOR_GEOIP_COUNTRY_DB",
        "asn": "DETECTOR_GEOIP_ASN_DB",
        "anonymous": "DETECTOR_ANONYMOUS_IP_DB",
        "hosting_asns": "DETECTOR_HOSTING_ASN_FILE",
        "connection_type": "DETECTOR_CONNECTION_TYPE_DB",
    }
    for kind, path in paths.items():
        print(f"export {env[kind]}={path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from detector import train
    from detector.runtime import build_intel, build_policy

    settings = _settings(args)
    path = train.train_from_jsonl(
        args.data,
        args.labels,
        settings.models_dir,
        args.name or settings.model_name,
        seed=args.seed,
        target_fpr=args.target_fpr,
        policy=build_policy(settings),
        intel=build_intel(settings),
        outcomes_path=args.outcomes,
        min_talk_s=args.min_talk_s,
    )
    import json

    card = json.loads(path.read_text(encoding="utf-8"))["training"]
    print(f"wrote model {path}: normal = {card['presumed_normal']} ({card['presumed_normal_share']:.1%} "
          f"of rows); contamination assumed {card['assumed_contamination']}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from detector import evaluate

    settings = _settings(args)
    report = evaluate.evaluate_cli(settings, args)
    if getattr(args, "json", False):
        import json

        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.render())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detector", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (env DETECTOR_LOG_LEVEL)")
    p.add_argument("--dev", dest="dev_mode", action="store_const", const=True, default=None,
                   help="development mode: allow the default PII hash key (env DETECTOR_DEV_MODE=1)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="simulate a mixed day and run it through the detector (no services)")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--legit", type=int, default=20_000, help="legitimate requests per day")
    d.add_argument("--attack-scale", dest="attack_scale", type=float, default=1.0)
    d.add_argument("--db", dest="sink_db", help="decision log to write (env DETECTOR_SINK_DB)")
    d.add_argument("--no-log", dest="no_log", action="store_true",
                   help="do not write the decision log and var/demo/ files")
    _add_core_flags(d)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("replay", help="decide JSONL requests offline, in timestamp order")
    r.add_argument("input", help="requests JSONL file, or - for stdin")
    r.add_argument("-o", "--output", help="decisions JSONL (default stdout)")
    r.add_argument("--rejects", help="rejected lines JSONL (default stderr)")
    r.add_argument("--check-event-time", dest="check_event_time", action="store_true",
                   help="reject requests whose ts is outside DETECTOR_MAX_FUTURE_SKEW_S / "
                        "DETECTOR_MAX_PAST_SKEW_S of the wall clock (off: replay reads history)")
    r.add_argument("--queue-states", dest="queue_states", type=Path, default=None,
                   help="dialer queue states JSONL (agent capacity), applied in time order; "
                        "without it the queue is normal throughout")
    _add_core_flags(r)
    r.set_defaults(func=cmd_replay)

    s = sub.add_parser("simulate", help="write labelled simulated traffic (JSONL + labels side file)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--out", type=Path, default=Path("requests.jsonl"))
    s.add_argument("--labels", type=Path, default=None)
    s.add_argument("--legit", type=int, default=20_000, help="legitimate requests per day")
    s.add_argument("--duration", type=float, default=86_400.0, help="seconds of traffic")
    s.add_argument("--attack-scale", dest="attack_scale", type=float, default=1.0)
    _add_scenario_flags(s)
    s.set_defaults(func=cmd_simulate)

    ipdb = sub.add_parser("sim-ipdb", help="write the simulator's synthetic IP databases (for trying it out)")
    ipdb.add_argument("out", type=Path, help="directory")
    ipdb.set_defaults(func=cmd_sim_ipdb)

    t = sub.add_parser("train", help="train the isolation forest and write models/<name>.{npz,json}")
    t.add_argument("data", type=Path, help="requests JSONL (presumed normal unless --labels is given)")
    t.add_argument("--labels", type=Path, default=None, help="labels side file: train on legit rows only")
    t.add_argument("--outcomes", type=Path, default=None,
                   help="dialer outcomes JSONL: requests completed with talk time are the normal evidence")
    t.add_argument("--min-talk-s", dest="min_talk_s", type=float, default=30.0,
                   help="talk time that makes a completed callback evidence of a customer (30)")
    t.add_argument("--name", default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--target-fpr", dest="target_fpr", type=float, default=0.005)
    _add_core_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="per-scenario stop rates: rules only, model only, combined")
    e.add_argument("data", type=Path, nargs="?", help="requests JSONL (default: simulator held-out seeds)")
    e.add_argument("--labels", type=Path, default=None)
    e.add_argument("--seeds", default="201,202", help="simulator seeds when no data is given")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--legit", type=int, default=None, help="legitimate requests per simulated day")
    e.add_argument("--duration", type=float, default=None, help="seconds of simulated traffic")
    _add_scenario_flags(e)
    _add_core_flags(e)
    e.set_defaults(func=cmd_evaluate)

    from detector import cli_stream, keys

    keys.add_command(sub)

    cli_stream.add_commands(sub, _add_core_flags)
    from detector import cli_soc

    cli_soc.add_commands(sub, _add_core_flags)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        level = args.log_level or load_settings(check_files=False).log_level
    except ConfigError as exc:
        print(f"detector: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from detector.runtime import tune_gc

    tune_gc()
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"detector: configuration error: {exc}", file=sys.stderr)
        return 2
    except DetectorError as exc:
        print(f"detector: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
