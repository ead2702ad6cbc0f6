"""The `detector` command line.

Exit codes: 0 success; 2 bad config, input or checkpoint (the message says which and why);
1 anything unexpected (a bug: the traceback is printed), or `detector models promote|rollback
--reload` saved the promotion but the daemon did not confirm the reload.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.config import Server, Stream, load_config, load_config_with_secrets, masked_dump
from detector.errors import CheckpointError, ConfigError, DetectorError

if TYPE_CHECKING:
    from detector.model import Checkpoint

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


class RepeatFilter(logging.Filter):
    """Lets one of each kafka-python message template through per `interval_s`.

    During a broker outage kafka-python logs the same connection error for every retry (about
    ten a second); the daemon says once that the broker is lost, so the repeats are noise that
    buries everything else. The next one through says how many were held back.
    """

    def __init__(self, prefix: str = "kafka", interval_s: float = 30.0) -> None:
        super().__init__()
        self.prefix = prefix
        self.interval_s = interval_s
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix) or record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        last, held = self._last.get(key, (-self.interval_s, 0))
        if record.created - last < self.interval_s:
            self._last[key] = (last, held + 1)
            return False
        self._last[key] = (record.created, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last {self.interval_s:.0f} s)"
        return True


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
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
    p.add_argument(
        "--out",
        type=Path,
        help="checkpoint file to write (default: a new version in the stream's model_store, "
        "else the stream's checkpoint path)",
    )
    p.add_argument(
        "--promote", action="store_true", help="promote the new version (it is anyway when nothing is promoted yet)"
    )
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
    p.add_argument(
        "--batch-rows",
        type=int,
        default=1024,
        help="rows per micro-batch (results do not depend on it; with retraining by window count, "
        "batches are at most `every_windows` rows, since retraining starts at a batch boundary)",
    )
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
    p.add_argument(
        "--windows",
        type=Path,
        help="labeled anomaly windows to draw (JSON: a list of [start, end] timestamps, or an object of such "
        "lists with --windows-key, e.g. NAB's labels/combined_windows.json)",
    )
    p.add_argument("--windows-key", help="the key of --windows' object to draw (NAB: category/file.csv)")

    p = sub.add_parser("evaluate", help="score detection quality on a labeled public benchmark")
    bench = p.add_subparsers(dest="benchmark", required=True)
    b = bench.add_parser("nab", help="Numenta Anomaly Benchmark: replay each series, NAB score per cost profile")
    b.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="holds nab/data and nab/labels")
    b.add_argument("--config", type=Path, default=Path("configs/system-metrics.yaml"))
    b.add_argument("--series", default="*", help="glob over category/file.csv (default: all)")
    b.add_argument("--out", type=Path, default=Path("build/eval/nab"), help="results.json, results.csv, scores/")
    b.add_argument("--jobs", type=int, default=2, help="series replayed in parallel (one torch thread each)")
    b.add_argument(
        "--seeds",
        help="run once per training seed (`0-4` or `0,3,7`), each under OUT/seed-N/, and print the mean and "
        "standard deviation: one seed moves the score by about 2 points",
    )
    b.add_argument(
        "--plots",
        action="store_true",
        help="also draw each series (values, score, threshold, alerts, labeled windows) to OUT/plots/*.png",
    )
    b = bench.add_parser("smd", help="Server Machine Dataset: train per machine, point/event/point-adjusted F1")
    b.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="holds smd/train, test, labels")
    b.add_argument("--config", type=Path, default=Path("configs/server-metrics.yaml"))
    b.add_argument("--machines", default=",".join(SMD_MACHINE_NAMES), help="comma-separated (default: all four)")
    b.add_argument("--out", type=Path, default=Path("build/eval/smd"), help="results.json, results.csv, scores/")
    b.add_argument("--jobs", type=int, default=2, help="machines trained in parallel (one torch thread each)")
    b.add_argument("--seeds", help="run once per training seed (`0-4` or `0,3,7`), each under OUT/seed-N/, and print "
                   "the mean and standard deviation")  # fmt: skip
    b.add_argument(
        "--plots",
        action="store_true",
        help="also draw each machine (top dims, score, threshold, alerts, labeled segments) to OUT/plots/*.png",
    )
    b = bench.add_parser("fraud", help="card transactions (Fraud Detection Handbook): AUC-ROC, AP, card precision@100")
    b.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="holds fraud/ (see its README)")
    b.add_argument("--config", type=Path, default=Path("configs/transactions.yaml"))
    b.add_argument("--out", type=Path, default=Path("build/eval/fraud"), help="results.json, scores.csv.gz")
    b.add_argument(
        "--split",
        default="7,7,7,7",
        metavar="W,T,D,E",
        help="days of warmup, train, delay, test from 1 July (7,7,0,7: the choice week, 15-21 July)",
    )
    b.add_argument("--seeds", help="run once per training seed (`0-4` or `0,3,7`), each under OUT/seed-N/, and print "
                   "the mean and standard deviation")  # fmt: skip

    p = sub.add_parser("models", help="list, show, promote and roll back the versions in a stream's model_store")
    actions = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, type=Path)
    common.add_argument("--stream", help="stream name (needed when the config has several)")
    reload_help = (
        "then ask the running daemon to switch: POST to URL (default: the config's server, /-/reload); "
        "without it, send the daemon SIGHUP or POST /-/reload yourself"
    )
    actions.add_parser("list", parents=[common], help="every version, oldest first; * marks the promoted one")
    a = actions.add_parser("show", parents=[common], help="one version's metadata as JSON")
    a.add_argument("version", nargs="?", help="default: the promoted version")
    a = actions.add_parser("promote", parents=[common], help="make VERSION the one the stream scores with")
    a.add_argument("version")
    a.add_argument("--reason", default="", help="recorded in the promotion history")
    a.add_argument("--reload", nargs="?", const="", metavar="URL", help=reload_help)
    a = actions.add_parser("rollback", parents=[common], help="re-promote the version promoted before the current one")
    a.add_argument("--reload", nargs="?", const="", metavar="URL", help=reload_help)

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
        if out is None and stream.model_store is None:
            print("detector: give --out (the stream has neither a checkpoint path nor a model_store)", file=sys.stderr)
            return EXIT_USAGE
        if args.promote and out is not None:
            print("detector: --promote needs a stream with a model_store, and no --out", file=sys.stderr)
            return EXIT_USAGE
        ckpt, summary = train_file(config, name, args.input, out, progress=not args.quiet)
        print_summary(summary)
        info = ckpt.training
        where = f"saved {out}" if out is not None else store_trained(stream, args.input, ckpt, args.promote)
        print(
            f"{where}: version {ckpt.version}, {info['train_windows']} training windows, "
            f"{info['epochs']} epochs, validation loss {info['best_validation_loss']:.4g}",
            file=sys.stderr,
        )
        return EXIT_OK

    if args.command == "models":
        return run_models(args)

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

    if args.command == "evaluate":
        return run_evaluate(args)

    if args.command == "run":
        from detector.service import run_daemon

        return run_daemon(load_config(args.config), args.config)

    if args.command == "demo":
        from detector.demo import run_demo

        return run_demo(args.workdir, args.seed, args.config, offline=args.offline, speed=args.speed)
    raise AssertionError(args.command)


def parse_seeds(text: str) -> list[int]:
    """`0-4` → [0, 1, 2, 3, 4]; `0,3,7` → [0, 3, 7]. Raises ValueError on anything else."""
    if "-" in text:
        first, last = (int(part) for part in text.split("-", 1))
        seeds = list(range(first, last + 1))
    else:
        seeds = [int(part) for part in text.split(",")]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"{text!r}: give seeds as FIRST-LAST or a comma-separated list of distinct seeds >= 0")
    return seeds


def run_evaluate(args: argparse.Namespace) -> int:
    """`detector evaluate BENCHMARK`: one run, or with `--seeds` one run per training seed under
    OUT/seed-N/ and their mean and standard deviation (printed, and in OUT/seeds.json)."""
    from detector.evaluate import over_seeds, print_seed_summary, seed_summary

    # Per benchmark: one run (config, out folder) → report, and how to show, write and summarize it.
    run: Callable[[Path, Path], Any]
    show: Callable[[Any], None]
    write: Callable[[Any, Path], Path | tuple[Path, ...]]
    row: Callable[[Any], dict[str, float]]
    if getattr(args, "plots", False):  # nab and smd draw after the run: a missing matplotlib fails before it
        from detector.report import require_matplotlib

        require_matplotlib()
    if args.benchmark == "smd":
        from detector.evaluate_smd import evaluate_smd, print_smd_report, smd_seed_row, write_smd_report

        machines = [m.strip() for m in args.machines.split(",") if m.strip()]

        def run(config: Path, out: Path) -> Any:
            return evaluate_smd(args.data_dir, config, out, machines, max(1, args.jobs), plots=args.plots)

        title = f"SMD ({machines[0]})" if len(machines) == 1 else f"SMD ({len(machines)} machines pooled)"
        show, write, row, digits = print_smd_report, write_smd_report, smd_seed_row, 3
    elif args.benchmark == "fraud":
        from detector.evaluate_fraud import (
            FraudSplit,
            evaluate_fraud,
            fraud_seed_row,
            print_fraud_report,
            write_fraud_report,
        )

        try:
            split = FraudSplit.parse(args.split)
        except ValueError as e:
            print(f"detector evaluate fraud: --split: {e}", file=sys.stderr)
            return EXIT_USAGE

        def run(config: Path, out: Path) -> Any:
            return evaluate_fraud(args.data_dir, config, out, split=split)

        show, write, row, title, digits = print_fraud_report, write_fraud_report, fraud_seed_row, "Fraud (combined)", 3
    else:
        from detector.evaluate import evaluate_nab, nab_seed_row, print_nab_report, write_nab_report

        def run(config: Path, out: Path) -> Any:
            report = evaluate_nab(args.data_dir, config, out, args.series, max(1, args.jobs))
            if args.plots:
                from detector.evaluate import write_nab_plots

                plots = write_nab_plots(args.data_dir, config, out, report)
                print(f"drew {len(plots)} series under {out / 'plots'}", file=sys.stderr)
            return report

        show, write, row, title, digits = print_nab_report, write_nab_report, nab_seed_row, "NAB (alert events)", 1

    def written(paths: Path | tuple[Path, ...]) -> str:
        return " and ".join(str(p) for p in (paths if isinstance(paths, tuple) else (paths,)))

    if args.seeds is None:
        report = run(args.config, args.out)
        show(report)
        print(f"wrote {written(write(report, args.out))}", file=sys.stderr)
        return EXIT_OK
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        print(f"detector evaluate {args.benchmark}: --seeds: {e}", file=sys.stderr)
        return EXIT_USAGE

    def one_seed(config: Path, out: Path) -> dict[str, float]:
        report = run(config, out)
        write(report, out)
        return dict(row(report))

    rows = over_seeds(args.config, args.out, seeds, one_seed)
    summary = seed_summary(str(args.config), list(zip(seeds, rows, strict=True)))
    print_seed_summary(summary, title, digits)
    (args.out / "seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}/seed-N/ and {args.out}/seeds.json", file=sys.stderr)
    return EXIT_OK


def store_trained(stream: Stream, data: Path | None, ckpt: Checkpoint, promote: bool) -> str:
    """Add a checkpoint `detector train` made to the stream's model store; promote it when
    asked or when nothing is promoted yet. Returns what was done, for the summary line."""
    from detector.replay import input_path
    from detector.source import format_timestamp
    from detector.store import CheckpointStore

    assert stream.model_store is not None
    store = CheckpointStore(stream.model_store)
    current = store.promoted()
    info = ckpt.training
    store.add(
        ckpt,
        parent=current,
        source="train",
        trained_on={
            "rows": info["rows"],
            "from": format_timestamp(info["first_ms"]),
            "until": format_timestamp(info["last_ms"]),
            "input": str(input_path(stream, data)),
        },
        validation_error=ckpt.errors.mean,
    )
    if promote or current is None:
        store.promote(ckpt.version, "detector train")
        return f"stored and promoted in {store.root}"
    return f"stored in {store.root} (promoted is still {current}; `detector models promote` to switch)"


def run_models(args: argparse.Namespace) -> int:
    """`detector models list|show|promote|rollback`."""
    from detector.store import CheckpointStore

    config = load_config(args.config)
    name, stream = config.stream(args.stream)
    if stream.model_store is None:
        raise ConfigError(str(args.config), [f"streams.{name}.model_store: not set; `detector models` needs one"])
    store = CheckpointStore(stream.model_store)
    if not store.root.is_dir():
        raise CheckpointError(f"model store {store.root} does not exist (`detector train` creates it)")
    promoted = store.promoted()

    if args.action == "list":
        rows = [("", "VERSION", "CREATED", "SOURCE", "PARENT", "VALIDATION_ERROR")]
        for v in store.versions():
            error = "-" if v.validation_error is None else f"{v.validation_error:.6g}"
            rows.append(("*" if v.version == promoted else "", v.version, v.created, v.source, v.parent or "-", error))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if len(rows) == 1:
            print(f"(no versions in {store.root})", file=sys.stderr)
        return EXIT_OK

    if args.action == "show":
        version = args.version or promoted
        if version is None:
            raise CheckpointError(f"model store {store.root} has no promoted version; name one")
        meta = store.metadata(version)
        meta["promoted"] = version == promoted
        meta["path"] = str(store.info(version).path)
        print(json.dumps(meta, indent=2, sort_keys=True))
        return EXIT_OK

    if args.action == "promote":
        store.load(args.version, stream)  # refuse a version the stream cannot score with, before promoting it
        store.promote(args.version, args.reason)
        print(f"{name}: promoted {args.version} (was {promoted or 'none'})", file=sys.stderr)
    else:
        version = store.rollback()
        print(f"{name}: rolled back to {version} (was {promoted})", file=sys.stderr)
    return tell_daemon(config.server, args.reload)


def tell_daemon(server: Server, url: str | None) -> int:
    """Ask a running daemon to reload (`--reload [URL]`), or say how to."""
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
    default = f"http://{host}:{server.port}/-/reload"
    if url is None:
        print(f"the running daemon switches on SIGHUP or `curl -X POST {default}`", file=sys.stderr)
        return EXIT_OK
    url = url or default
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=60) as response:
            print(f"daemon: {response.read().decode().strip()}", file=sys.stderr)
        return EXIT_OK
    except urllib.error.HTTPError as exc:
        reason = exc.read().decode(errors="replace").strip()
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    print(f"detector: the promotion is saved, but the daemon at {url} did not reload: {reason}", file=sys.stderr)
    return EXIT_BUG


def run_report(args: argparse.Namespace) -> int:
    from detector.report import read_windows, require_matplotlib, write_report

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
    if args.windows_key is not None and args.windows is None:
        print("detector: --windows-key needs --windows", file=sys.stderr)
        return EXIT_USAGE
    labeled = read_windows(args.windows, args.windows_key) if args.windows is not None else []
    entities = [e.strip() for e in args.entities.split(",") if e.strip()] if args.entities else None
    summary = write_report(args.scores, args.out, args.alerts, samples, entities, args.max_entities, labeled)
    left = f", {len(summary.left_out)} left out" if summary.left_out else ""
    print(
        f"wrote {args.out}: {len(summary.shown)} entities{left}; "
        f"{summary.firing} firing, {summary.resolved} resolved alert(s)",
        file=sys.stderr,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
