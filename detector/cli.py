"""The `detector` command line.

Exit codes: 0 success; 2 bad config, input or checkpoint (the message says which and why);
1 anything unexpected (a bug: the traceback is printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from detector.config import load_config, load_config_with_secrets, masked_dump
from detector.errors import DetectorError

EXIT_OK, EXIT_BUG, EXIT_USAGE = 0, 1, 2
# `detector evaluate smd` defaults; detector.evaluate_smd.SMD_MACHINES (not imported here: it pulls numpy in).
SMD_MACHINE_NAMES = ("machine-1-6", "machine-2-1", "machine-2-7", "machine-3-3")


def package_version() -> str:
    try:
        return version("detector")
    except PackageNotFoundError:
        return "0+unknown"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # kafka-python narrates every connection at INFO; its warnings and errors still show.
    if level != "debug":
        logging.getLogger("kafka").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detector", description="Streaming anomaly detection with recurrent autoencoders."
    )
    parser.add_argument("--version", action="version", version=f"detector {package_version()}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a config file; exit 0 if valid, 2 if not")
    p.add_argument("config", type=Path)
    p.add_argument("--show", action="store_true", help="print the effective config, secrets masked")

    p = sub.add_parser("config-reference", help="print the config reference (markdown) generated from the models")
    p.add_argument("--update-readme", action="store_true", help="rewrite the reference block in --readme instead")
    p.add_argument("--readme", type=Path, default=Path("README.md"), help="README to update (default: ./README.md)")

    p = sub.add_parser("train", help="train a stream's model on a CSV or JSONL file")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--stream", help="stream name (needed when the config has several)")
    p.add_argument("--input", type=Path, help="training data (default: the stream's file input)")
    p.add_argument("--out", type=Path, help="checkpoint to write (default: the stream's checkpoint path)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("replay", help="score a file through the daemon's pipeline")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--stream", help="stream name (needed when the config has several)")
    p.add_argument("--input", type=Path, help="data to score (default: the stream's file input)")
    p.add_argument("--out", required=True, type=Path, help="scores CSV, one row per input row")
    p.add_argument("--alerts", type=Path, help="also write alert events here as JSON lines")
    p.add_argument("--checkpoint", type=Path, help="model to score with (default: the stream's checkpoint)")
    p.add_argument("--train-rows", help="first train on the first N rows (or N%%) of each entity, then score the rest")
    p.add_argument("--train-until", help="first train on rows before this timestamp, then score the rest")
    p.add_argument("--save-checkpoint", type=Path, help="with --train-rows/--train-until: keep the trained model here")
    p.add_argument("--batch-rows", type=int, default=1024, help="rows per micro-batch (results do not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("report", help="draw series, score, threshold and alerts per entity (PNG or HTML)")
    p.add_argument("--scores", required=True, type=Path, help="scores CSV written by `detector replay`")
    p.add_argument("--out", required=True, type=Path, help="report.png (one figure) or report.html (self-contained)")
    p.add_argument("--alerts", type=Path, help="alert events (JSON lines) from the same replay")
    p.add_argument("--input", type=Path, help="the replayed data, to plot feature values (needs --config)")
    p.add_argument("--config", type=Path, help="config whose stream mapping decodes --input")
    p.add_argument("--stream", help="stream name (needed when the config has several)")
    p.add_argument("--entities", help="comma-separated entities to show (default: all, most alerts first)")
    p.add_argument("--max-entities", type=int, default=12, help="show at most this many entities")

    p = sub.add_parser("evaluate", help="score detection quality on a labeled public benchmark")
    bench = p.add_subparsers(dest="benchmark", required=True)
    b = bench.add_parser("nab", help="Numenta Anomaly Benchmark: replay each series, NAB score per cost profile")
    b.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="holds nab/data and nab/labels")
    b.add_argument("--config", type=Path, default=Path("configs/system-metrics.yaml"))
    b.add_argument("--series", default="*", help="glob over category/file.csv (default: all)")
    b.add_argument("--out", type=Path, default=Path("build/eval/nab"), help="results.json, results.csv, scores/")
    b.add_argument("--jobs", type=int, default=2, help="series replayed in parallel (one torch thread each)")
    b = bench.add_parser("smd", help="Server Machine Dataset: train per machine, point/event/point-adjusted F1")
    b.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="holds smd/train, test, labels")
    b.add_argument("--config", type=Path, default=Path("configs/system-metrics.yaml"))
    b.add_argument("--machines", default=",".join(SMD_MACHINE_NAMES), help="comma-separated (default: all four)")
    b.add_argument("--out", type=Path, default=Path("build/eval/smd"), help="results.json, results.csv, scores/")
    b.add_argument("--jobs", type=int, default=2, help="machines trained in parallel (one torch thread each)")
    b = bench.add_parser("fraud", help="card transactions (Fraud Detection Handbook): AUC-ROC, AP, card precision@100")
    b.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="holds fraud/ (see its README)")
    b.add_argument("--config", type=Path, default=Path("configs/transactions.yaml"))
    b.add_argument("--out", type=Path, default=Path("build/eval/fraud"), help="results.json, scores.csv.gz")

    p = sub.add_parser("run", help="the daemon: consume Kafka, score, alert, serve /metrics (SIGHUP reloads)")
    p.add_argument("--config", required=True, type=Path)

    p = sub.add_parser("demo", help="generate a metric stream with faults, train, replay, and report")
    p.add_argument("--workdir", type=Path, default=Path("build/demo"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    p.add_argument("--offline", action="store_true", help="replay the files instead of running the daemon on a broker")
    p.add_argument("--speed", type=float, default=2.0, help="simulated hours per second of the live stream")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return run(args)
    except DetectorError as exc:
        print(f"detector: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace) -> int:
    # Imported here so `detector check-config` and `--help` do not pay for importing torch.
    if args.command == "check-config":
        config, secrets = load_config_with_secrets(args.config)
        if args.show:
            print(masked_dump(config, secrets), end="")
        print(f"{args.config}: ok ({len(config.streams)} stream(s): {', '.join(config.streams)})", file=sys.stderr)
        return EXIT_OK

    if args.command == "config-reference":
        from detector.reference import config_reference_command

        return config_reference_command(args.update_readme, args.readme)

    if args.command == "train":
        from detector.replay import print_summary, train_file

        config = load_config(args.config)
        name, stream = config.stream(args.stream)
        out = args.out or stream.checkpoint
        if out is None:
            print("detector: give --out (the stream has no checkpoint path)", file=sys.stderr)
            return EXIT_USAGE
        ckpt, summary = train_file(config, name, args.input, out, progress=not args.quiet)
        print_summary(summary)
        info = ckpt.training
        print(
            f"saved {out}: version {ckpt.version}, {info['train_windows']} training windows, "
            f"{info['epochs']} epochs, validation loss {info['best_validation_loss']:.4g}",
            file=sys.stderr,
        )
        return EXIT_OK

    if args.command == "replay":
        from detector.replay import TrainSplit, print_summary, replay_file

        config = load_config(args.config)
        split = TrainSplit.parse(args.train_rows, args.train_until)
        summary, _ = replay_file(
            config,
            args.stream,
            args.input,
            args.out,
            alerts_path=args.alerts,
            checkpoint=args.checkpoint,
            split=split,
            save_to=args.save_checkpoint,
            batch_rows=max(1, args.batch_rows),
            progress=not args.quiet,
        )
        print_summary(summary)
        return EXIT_OK

    if args.command == "report":
        return run_report(args)

    if args.command == "evaluate" and args.benchmark == "smd":
        from detector.evaluate_smd import evaluate_smd, print_smd_report, write_smd_report

        machines = [m.strip() for m in args.machines.split(",") if m.strip()]
        smd = evaluate_smd(args.data_dir, args.config, args.out, machines, max(1, args.jobs))
        print_smd_report(smd)
        json_path, csv_path = write_smd_report(smd, args.out)
        print(f"wrote {json_path} and {csv_path}", file=sys.stderr)
        return EXIT_OK

    if args.command == "evaluate" and args.benchmark == "fraud":
        from detector.evaluate_fraud import evaluate_fraud, print_fraud_report, write_fraud_report

        fraud = evaluate_fraud(args.data_dir, args.config, args.out)
        print_fraud_report(fraud)
        print(f"wrote {write_fraud_report(fraud, args.out)}", file=sys.stderr)
        return EXIT_OK

    if args.command == "evaluate":
        from detector.evaluate import evaluate_nab, print_nab_report, write_nab_report

        report = evaluate_nab(args.data_dir, args.config, args.out, args.series, max(1, args.jobs))
        print_nab_report(report)
        json_path, csv_path = write_nab_report(report, args.out)
        print(f"wrote {json_path} and {csv_path}", file=sys.stderr)
        return EXIT_OK

    if args.command == "run":
        from detector.service import run_daemon

        return run_daemon(load_config(args.config), args.config)

    if args.command == "demo":
        from detector.demo import run_demo

        return run_demo(args.workdir, args.seed, args.config, offline=args.offline, speed=args.speed)
    raise AssertionError(args.command)


def run_report(args: argparse.Namespace) -> int:
    from detector.report import require_matplotlib, write_report

    require_matplotlib()  # before decoding a large input for nothing
    samples = None
    if args.config is not None:
        from detector.replay import input_path, read_samples

        name, stream = load_config(args.config).stream(args.stream)
        batch, _ = read_samples(name, stream, input_path(stream, args.input))
        samples = (batch, [f.name for f in stream.mapping.features])
    elif args.input is not None:
        print("detector: --input needs --config (its stream mapping decodes the file)", file=sys.stderr)
        return EXIT_USAGE
    entities = [e.strip() for e in args.entities.split(",") if e.strip()] if args.entities else None
    summary = write_report(args.scores, args.out, args.alerts, samples, entities, args.max_entities)
    left = f", {len(summary.left_out)} left out" if summary.left_out else ""
    print(
        f"wrote {args.out}: {len(summary.shown)} entities{left}; "
        f"{summary.firing} firing, {summary.resolved} resolved alert(s)",
        file=sys.stderr,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
