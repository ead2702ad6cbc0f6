"""Model throughput: windows/s of batched inference, and GFLOP/s against a measured matmul peak.

Scores random windows with a freshly initialised (seeded) LSTM autoencoder through
`detector.model.score_windows` and `detector.engine.OnnxScorer`, the calls the pipeline makes (padding to 16
rows, numpy in and out), for each window size W, feature count D, hidden size H, batch size
and thread count. The fp32 matmul peak is measured in the same run with the same threads.

FLOPs per window (multiply-add = 2 FLOPs, matmuls only; gate nonlinearities, biases and the
squared error are left out, they are O(W·H) against O(W·H²)):

    encoder LSTM   W · 8H(D + H)        4 gates of H, input D, recurrent H
    to_latent      2HL
    from_latent    2LH
    decoder LSTM   W · 8H(H + H)        its input is the H-wide latent projection at every step
    output linear  W · 2HD

    total = W·(8H(D+H) + 16H² + 2HD) + 4HL      (W=64, D=1, H=32, L=16: 1.595 MFLOP)

The GFLOP/s and % columns count these nominal FLOPs for both engines. The ONNX Runtime graph
does less of them: it folds from_latent into the decoder's input weights (the decoder reads
the L-wide latent), so its decoder input costs W·8HL, not W·8H² (W=64, D=1, H=32, L=16: 1.333
MFLOP executed, 83.5% of nominal). Compare engines by windows/s.

Usage:
    python benchmarks/model_throughput.py            # default subset (about 2 minutes on 2 cores)
    python benchmarks/model_throughput.py --full     # every W, D, H, batch size 1..1024
    python benchmarks/model_throughput.py --bf16 all # bf16 for every row (even where emulated)
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch
from _common import cpu_flags, footer, header, table

from detector.config import ModelSpec
from detector.engine import OnnxScorer
from detector.model import RecurrentAutoencoder, score_windows

LATENT = 16
TARGET = (64, 1, 32)  # the W, D, H
TARGET_BATCH = 256


def flops_per_window(w: int, d: int, h: int, latent: int = LATENT) -> int:
    return w * (8 * h * (d + h) + 16 * h * h + 2 * h * d) + 4 * h * latent


def timed(fn: object, min_seconds: float, repeats: int = 3) -> float:
    """Best seconds per call over `repeats` runs of at least `min_seconds` each."""
    call = fn  # type: ignore[assignment]
    call()  # type: ignore[operator]
    best = float("inf")
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            call()  # type: ignore[operator]
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / n)
    return best


def matmul_peak(threads: int, size: int, min_seconds: float) -> float:
    """fp32 GFLOP/s of torch.mm on `size`x`size` matrices (best of 3)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    out = torch.empty(size, size)
    seconds = timed(lambda: torch.mm(a, b, out=out), min_seconds)
    return 2 * size**3 / seconds / 1e9


def build_model(d: int, h: int) -> RecurrentAutoencoder:
    torch.manual_seed(0)
    model = RecurrentAutoencoder(d, ModelSpec(cell="lstm", hidden_size=h, latent_size=LATENT))
    return model.eval()


def bf16_scores(model: torch.nn.Module, windows: np.ndarray) -> np.ndarray:
    """Scores with bf16 weights and inputs, error computed in fp32 (the same padding as fp32)."""
    with torch.inference_mode():
        x = torch.from_numpy(windows)
        rows = -(-len(x) // 16) * 16
        if rows > len(x):
            x = torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])
        recon = model(x.to(torch.bfloat16)).float()
        return (recon - x).pow(2).mean(dim=(1, 2))[: len(windows)].numpy()  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every W, D, H and batch size")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument(
        "--bf16",
        choices=["auto", "target", "all", "off"],
        default="auto",
        help="auto: every row where the CPU has native bf16, else only the target rows (W=64 D=1 H=32 batch 256)",
    )
    parser.add_argument(
        "--engines", default="torch,onnxruntime", help="comma-separated: torch, onnxruntime (scoring.engine)"
    )
    parser.add_argument("--seconds", type=float, default=0.3, help="least time per measurement (best of 3)")
    parser.add_argument("--mm-size", type=int, default=1024, help="matmul size for the peak")
    args = parser.parse_args()

    threads_list = [int(t) for t in args.threads.split(",")]
    engines = args.engines.split(",")
    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    bf16_mode = args.bf16
    if bf16_mode == "auto":
        bf16_mode = "all" if native_bf16 else "target"
    if args.full:
        shapes = list(itertools.product((32, 64, 128), (1, 38), (32, 64)))
        batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
        grid = [(w, d, h, b) for (w, d, h) in shapes for b in batches]
    else:
        grid = [(*TARGET, b) for b in (1, 16, 64, 256, 1024)]
        grid += [(w, d, h, TARGET_BATCH) for w, d, h in itertools.product((32, 64, 128), (1, 38), (32, 64))]
        grid = list(dict.fromkeys(grid))

    flags = cpu_flags()
    header(
        "model throughput: score_windows (LSTM autoencoder, inference mode)",
        {
            "model": f"LSTM, 1 layer, latent {LATENT}, seeded random weights; inputs N(0,1)",
            "grid": "full"
            if args.full
            else "default subset (target W=64 D=1 H=32 over batch sizes; batch 256 for all)",
            "timing": f"best of 3 runs of >= {args.seconds} s each, after one warm-up call",
            "threads": threads_list,
            "matmul": f"torch.mm fp32 {args.mm_size}x{args.mm_size}, same threads, same run",
            "bf16": f"native={native_bf16} (avx512_bf16={'avx512_bf16' in flags}, amx_bf16={'amx_bf16' in flags}); "
            f"rows: {bf16_mode}" + ("" if native_bf16 else " -- EMULATED on this CPU, expect it to be slow"),
            "flops": "W*(8H(D+H) + 16H^2 + 2HD) + 4HL per window",
            "engines": f"{engines} (scoring.engine; onnxruntime: the same weights as an ONNX graph)",
        },
    )

    peaks = {}
    for threads in threads_list:
        peaks[threads] = matmul_peak(threads, args.mm_size, args.seconds)
    table(["threads", "fp32 matmul GFLOP/s"], [[t, peaks[t]] for t in threads_list])
    print()

    rows = []
    rng = np.random.default_rng(0)
    models: dict[tuple[int, int], RecurrentAutoencoder] = {}
    for w, d, h, batch in grid:
        model = models.setdefault((d, h), build_model(d, h))
        windows = rng.standard_normal((batch, w, d), dtype=np.float32)
        flops = flops_per_window(w, d, h)
        want_bf16 = bf16_mode == "all" or (bf16_mode == "target" and (w, d, h, batch) == (*TARGET, TARGET_BATCH))
        for threads in threads_list:
            torch.set_num_threads(threads)
            for engine in engines:
                if engine == "torch":
                    seconds = timed(lambda m=model, x=windows: score_windows(m, x, batch_size=1024), args.seconds)
                else:
                    scorer = OnnxScorer(model, w, 1024, threads)
                    seconds = timed(lambda s=scorer, x=windows: s.score(x), args.seconds)
                wps = batch / seconds
                gflops = wps * flops / 1e9
                row = [w, d, h, batch, threads, f"fp32 {engine}", wps, gflops, 100 * gflops / peaks[threads], "", ""]
                rows.append(row)
            if want_bf16:
                bf = build_model(d, h).to(torch.bfloat16)
                bf.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
                seconds = timed(lambda m=bf, x=windows: bf16_scores(m, x), args.seconds)
                ref, _ = score_windows(model, windows)
                low = bf16_scores(bf, windows)
                rel = np.abs(low - ref) / np.maximum(np.abs(ref), 1e-12)
                wps = batch / seconds
                gflops = wps * flops / 1e9
                rows.append(
                    [
                        w,
                        d,
                        h,
                        batch,
                        threads,
                        "bf16" + ("" if native_bf16 else " (emul.)"),
                        wps,
                        gflops,
                        100 * gflops / peaks[threads],
                        f"{np.median(rel):.2e}",
                        f"{rel.max():.2e}",
                    ]
                )
    table(
        [
            "W",
            "D",
            "H",
            "batch",
            "threads",
            "dtype",
            "windows/s",
            "GFLOP/s",
            "% of mm peak",
            "bf16 rel. diff med",
            "bf16 rel. diff max",
        ],
        rows,
    )
    print(
        "\nMFLOP per window: "
        + ", ".join(
            f"W{w} D{d} H{h}: {flops_per_window(w, d, h) / 1e6:.3f}"
            for w, d, h in itertools.product((32, 64, 128), (1, 38), (32, 64))
        )
    )
    footer()


if __name__ == "__main__":
    main()
