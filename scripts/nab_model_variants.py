"""NAB scores of config variants that change the model's scores (window, model, training,
retraining, regime): one full `detector evaluate nab` run per variant. For threshold and
alert-policy variants, `nab_variants.py` re-thresholds cached scores much faster.

Each variant is NAME=JSON, the JSON merged into the config's single stream; the variant's config
and results land in --out/NAME/.

    .venv/bin/python scripts/nab_model_variants.py --out build/exp-nab \\
        'base={}' 'last1={"model": {"score_last_steps": 1}}' 'w64={"window": {"size": 64}}'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from nab_variants import merged  # the same override merge as the threshold-variant script

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/system-metrics.yaml")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--out", type=Path, default=ROOT / "build/nab-model-variants")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("variants", nargs="+", help="NAME=JSON override of the stream config")
    args = parser.parse_args()

    base = yaml.safe_load(args.config.read_text())
    (name, stream), *rest = base["streams"].items()
    if rest:
        sys.exit(f"{args.config}: one stream expected")
    print(f"{'variant':<16} {'standard':>8} {'low_FP':>7} {'low_FN':>7} {'found':>5} {'FP':>4} {'s':>5}  override")
    for variant in args.variants:
        label, _, text = variant.partition("=")
        out = (args.out / label).resolve()
        out.mkdir(parents=True, exist_ok=True)
        config = out / "config.yaml"
        config.write_text(yaml.safe_dump({**base, "streams": {name: merged(stream, json.loads(text))}}))
        started = time.monotonic()
        command = [
            *(sys.executable, "-m", "detector", "evaluate", "nab", "--config", str(config)),
            *("--data-dir", str(args.data_dir.resolve()), "--out", str(out / "eval"), "--jobs", str(args.jobs)),
        ]
        run = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT)
        if run.returncode:
            print(f"{label:<16} failed: {run.stderr.strip()[-300:]}", flush=True)
            continue
        alerts = json.loads((out / "eval/results.json").read_text())["results"]["alerts"]
        categories = alerts["standard"]["categories"].values()
        found = sum(c["detected"] for c in categories)
        false = sum(c["false_positives"] for c in categories)
        cells = [alerts[p]["normalized"] for p in ("standard", "reward_low_FP_rate", "reward_low_FN_rate")]
        print(
            f"{label:<16} {cells[0]:>8.1f} {cells[1]:>7.1f} {cells[2]:>7.1f} {found:>5} {false:>4} "
            f"{time.monotonic() - started:>5.0f}  {text}",
            flush=True,
        )


if __name__ == "__main__":
    main()
