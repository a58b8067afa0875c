"""``detector``: the command line. Every flag also has a ``DETECTOR_*`` environment variable.

Subcommands: demo, replay, simulate, train, evaluate, worker, produce, tail, lists.
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
    from detector.core.pipeline import Detector
    from detector.replay import replay
    from detector.runtime import build_intel

    settings = _settings(args)
    ctx = _context(settings, args)
    det = Detector(ctx, build_intel(settings))
    src = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    out = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    rej = sys.stderr if args.rejects is None else open(args.rejects, "w", encoding="utf-8")  # noqa: SIM115
    try:
        summary = replay(
            src, det, out=out, rejects=rej, progress=sys.stderr.isatty() and out is not sys.stdout
        )
    finally:
        for fh in (src, out, rej):
            if fh not in (sys.stdin, sys.stdout, sys.stderr):
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
    )
    print(result.text)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from detector.sim import SimConfig, simulate, write_jsonl

    items = simulate(
        SimConfig(
            seed=args.seed,
            legit_per_day=args.legit,
            duration_s=args.duration,
            attack_scale=args.attack_scale,
        )
    )
    labels = args.labels or Path(str(args.out).removesuffix(".jsonl") + ".labels.jsonl")
    write_jsonl(items, args.out, labels)
    print(f"wrote {len(items):,} requests to {args.out} and labels to {labels}", file=sys.stderr)
    return 0


def cmd_sim_ipdb(args: argparse.Namespace) -> int:
    from detector.sim import build_ip_databases

    args.out.mkdir(parents=True, exist_ok=True)
    paths = build_ip_databases(args.out)
    env = {
        "country": "DETECTOR_GEOIP_COUNTRY_DB",
        "asn": "DETECTOR_GEOIP_ASN_DB",
        "anonymous": "DETECTOR_ANONYMOUS_IP_DB",
        "hosting_asns": "DETECTOR_HOSTING_ASN_FILE",
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
    )
    print(f"wrote model {path}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from detector import evaluate

    settings = _settings(args)
    report = evaluate.evaluate_cli(settings, args)
    print(report.render())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detector", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (env DETECTOR_LOG_LEVEL)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="simulate a mixed day and run it through the detector (no services)")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--legit", type=int, default=20_000, help="legitimate requests per day")
    d.add_argument("--attack-scale", dest="attack_scale", type=float, default=1.0)
    _add_core_flags(d)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("replay", help="decide JSONL requests offline, in timestamp order")
    r.add_argument("input", help="requests JSONL file, or - for stdin")
    r.add_argument("-o", "--output", help="decisions JSONL (default stdout)")
    r.add_argument("--rejects", help="rejected lines JSONL (default stderr)")
    _add_core_flags(r)
    r.set_defaults(func=cmd_replay)

    s = sub.add_parser("simulate", help="write labelled simulated traffic (JSONL + labels side file)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--out", type=Path, default=Path("requests.jsonl"))
    s.add_argument("--labels", type=Path, default=None)
    s.add_argument("--legit", type=int, default=20_000, help="legitimate requests per day")
    s.add_argument("--duration", type=float, default=86_400.0, help="seconds of traffic")
    s.add_argument("--attack-scale", dest="attack_scale", type=float, default=1.0)
    s.set_defaults(func=cmd_simulate)

    ipdb = sub.add_parser("sim-ipdb", help="write the simulator's synthetic IP databases (for trying it out)")
    ipdb.add_argument("out", type=Path, help="directory")
    ipdb.set_defaults(func=cmd_sim_ipdb)

    t = sub.add_parser("train", help="train the isolation forest and write models/<name>.{npz,json}")
    t.add_argument("data", type=Path, help="requests JSONL (presumed normal unless --labels is given)")
    t.add_argument("--labels", type=Path, default=None, help="labels side file: train on legit rows only")
    t.add_argument("--name", default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--target-fpr", dest="target_fpr", type=float, default=0.005)
    _add_core_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="per-scenario stop rates: rules only, model only, combined")
    e.add_argument("data", type=Path, nargs="?", help="requests JSONL (default: simulator held-out seeds)")
    e.add_argument("--labels", type=Path, default=None)
    e.add_argument("--seeds", default="201,202", help="simulator seeds when no data is given")
    _add_core_flags(e)
    e.set_defaults(func=cmd_evaluate)

    from detector import cli_stream

    cli_stream.add_commands(sub, _add_core_flags)
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
