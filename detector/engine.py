"""Scoring engines: how a stream's windows go through its model.

`torch` runs the `RecurrentAutoencoder` itself. `onnxruntime` runs the same network, with the
same weights, as an ONNX graph in ONNX Runtime: its fused recurrent kernels score 1.1-2.4x
the windows per second of torch's at batch 256 (1.32x at W=64, D=1, H=32 on one thread;
docs/performance.md), and the scores agree to float32 rounding (a few 1e-8 relative).

The graph is built here from the model's weights with `onnx.helper`, in milliseconds, each
time a model is loaded or swapped. torch's own exporters were measured first: the maintained
one (`torch.onnx.export(dynamo=True)`) takes 20-47 s per model and unrolls a plain RNN step by
step; the fast one is the TorchScript exporter, deprecated and due for removal.

Both engines score in passes padded to a multiple of 16 rows (`detector.model.score_in_passes`),
so a window's score does not depend on how windows were cut into batches, in either engine.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np
from torch import nn

from detector.config import Scoring
from detector.model import Autoencoder, RecurrentAutoencoder, autoencoders, score_in_passes, score_windows

OPSET = 17
# Rows of each gate block, from torch's order to ONNX's: LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h.
_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn": (0,)}
_ONNX_OP = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


class Scorer(Protocol):
    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-window (R,) and per-feature (R, D) reconstruction errors of normalized windows (R, W, D)."""
        ...


class TorchScorer:
    def __init__(self, model: Autoencoder, batch_windows: int) -> None:
        self.model = model
        self.batch_windows = batch_windows

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return score_windows(self.model, windows, self.batch_windows, self.model.spec.score_last_steps)


class OnnxScorer:
    def __init__(self, model: RecurrentAutoencoder, window_size: int, batch_windows: int, threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one per core
        options.inter_op_num_threads = 1
        # Idle pool threads would otherwise spin between batches, taking CPU from the Kafka client.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = onnx_graph(model, window_size).SerializeToString()
        self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.batch_windows = batch_windows

    def _run(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_window, per_feature = self._session.run(None, {"windows": chunk})
        return per_window, per_feature

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return score_in_passes(self._run, np.ascontiguousarray(windows, dtype=np.float32), self.batch_windows)


class EnsembleScorer:
    """An ensemble's scores: the mean or the median of its members' scorers, per window and per
    feature (`detector.model.reconstruction_error` combines them the same way in torch)."""

    def __init__(self, members: list[Scorer], combine: Literal["mean", "median"]) -> None:
        self.members = members
        self.combine = np.mean if combine == "mean" else np.median

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scored = [m.score(windows) for m in self.members]
        per_window = self.combine(np.stack([s for s, _ in scored]), axis=0).astype(np.float32)
        return per_window, self.combine(np.stack([f for _, f in scored]), axis=0).astype(np.float32)


def make_scorer(model: Autoencoder, window_size: int, scoring: Scoring) -> Scorer:
    """The scorer `scoring.engine` names (the config checked at load that its packages are installed)."""
    if scoring.engine == "torch":
        return TorchScorer(model, scoring.batch_windows)
    members: list[Scorer] = [
        OnnxScorer(m, window_size, scoring.batch_windows, scoring.threads) for m in autoencoders(model)
    ]
    return members[0] if len(members) == 1 else EnsembleScorer(members, model.spec.ensemble_score)


# --- the ONNX graph --------------------------------------------------------------------------


def onnx_graph(model: RecurrentAutoencoder, window_size: int) -> Any:
    """The model and its reconstruction error as an ONNX graph.

    Input `windows` (B, W, D) float32; outputs `per_window` (B,) and `per_feature` (B, D), as
    `detector.model.reconstruction_error` computes them (over the last `score_last_steps` steps).
    """
    from onnx import TensorProto, helper, numpy_helper

    spec = model.spec
    hidden, w = spec.hidden_size, window_size
    nodes: list[Any] = []
    weights: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        weights.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def gates(param: Any) -> np.ndarray:
        """A torch weight or bias (gates * H, ...) as ONNX wants it: gate blocks reordered, (1, gates * H, ...)."""
        order = _GATE_ORDER[spec.cell]
        value = param if isinstance(param, np.ndarray) else param.detach().numpy()
        blocks = value.reshape(len(order), hidden, *value.shape[1:])
        reordered: np.ndarray = blocks[list(order)].reshape(1, *value.shape)
        return reordered

    def recurrent(
        rnn: nn.Module,
        x: str,
        prefix: str,
        first_input: tuple[np.ndarray, np.ndarray] | None = None,
        sequence: bool = True,
    ) -> tuple[str, str]:
        """Stacked layers over x (W, B, in): the top layer's outputs (W, B, H) and last state (B, H).
        `first_input`: the first layer's input weight and bias, in torch's layout, when not its own.
        Without `sequence` the top layer writes no outputs, only its last state ("" for them)."""
        last = ""
        for layer in range(spec.num_layers):
            p = f"{prefix}{layer}"
            w_in, b_in = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"bias_ih_l{layer}")
            if layer == 0 and first_input is not None:
                w_in, b_in = first_input
            w_ih = const(f"{p}_w", gates(w_in))
            w_hh = const(f"{p}_r", gates(getattr(rnn, f"weight_hh_l{layer}")))
            b_ih, b_hh = gates(b_in), gates(getattr(rnn, f"bias_hh_l{layer}"))
            bias = const(f"{p}_b", np.concatenate([b_ih, b_hh], axis=1))
            attrs: dict[str, Any] = {"hidden_size": hidden}
            if spec.cell == "gru":
                attrs["linear_before_reset"] = 1  # torch applies the reset gate after the recurrent matmul
            top_only = not sequence and layer == spec.num_layers - 1
            outputs = ["" if top_only else f"{p}_y", f"{p}_h"]
            nodes.append(helper.make_node(_ONNX_OP[spec.cell], [x, w_ih, w_hh, bias], outputs, name=p, **attrs))
            x = "" if top_only else node("Squeeze", [f"{p}_y", axis1], f"{p}_seq")  # (W, 1, B, H) -> (W, B, H)
            last = node("Squeeze", [f"{p}_h", axis0], f"{p}_last")  # (1, B, H) -> (B, H)
        return x, last

    axis0, axis1 = const("axis0", np.array([0], np.int64)), const("axis1", np.array([1], np.int64))
    time_major = node("Transpose", ["windows"], "time_major", perm=[1, 0, 2])
    # Only attention reads the encoder's outputs; otherwise its top layer writes none (a (W, B, H)
    # buffer per pass, as large as the windows times H).
    encoded, last = recurrent(model.encoder, time_major, "encoder", sequence=spec.attention)
    to_latent, from_latent = model.to_latent, model.from_latent
    latent = node(
        "Tanh",
        [node("Gemm", [last, const("to_latent_w", to_latent.weight.detach().numpy()),
                       const("to_latent_b", to_latent.bias.detach().numpy())], "latent_pre", transB=1)],
        "latent",
    )  # fmt: skip

    # The decoder's input is from_latent(latent) at every step, and nothing nonlinear lies
    # between the two linear maps: folded into one, the decoder reads the latent (L wide)
    # instead of H-wide steps, and its input projection costs L/H of torch's (same function,
    # float32 rounding apart; the products are taken in float64).
    def float64(param: Any) -> np.ndarray:
        return np.asarray(param.detach().double().numpy())

    dec_w = float64(getattr(model.decoder, "weight_ih_l0"))  # noqa: B009 (nn.Module attributes are untyped)
    folded = (
        (dec_w @ float64(from_latent.weight)).astype(np.float32),
        (float64(getattr(model.decoder, "bias_ih_l0")) + dec_w @ float64(from_latent.bias)).astype(np.float32),  # noqa: B009
    )
    steps = node(
        "Expand",
        [node("Unsqueeze", [latent, axis0], "latent1"), const("repeat", np.array([w, 1, 1], np.int64))],
        "steps",
    )
    decoded, _ = recurrent(model.decoder, steps, "decoder", folded)
    # Without attention the error is taken time-major, (W, B, D) against the transposed input,
    # so the decoder's (W, B, H) outputs are never transposed (D is usually far below H).
    target, time_dim = time_major, 0
    if spec.attention:
        decoded = node("Transpose", [decoded], "decoded_bwh", perm=[1, 0, 2])
        encoded = node("Transpose", [encoded], "encoded_bwh", perm=[1, 0, 2])
        logits = node("MatMul", [decoded, node("Transpose", [encoded], "encoded_bhw", perm=[0, 2, 1])], "logits")
        scaled = node("Div", [logits, const("sqrt_h", np.array(hidden**0.5, np.float32))], "scaled")
        context = node("MatMul", [node("Softmax", [scaled], "attention", axis=-1), encoded], "context")
        decoded = node("Concat", [decoded, context], "decoded_ctx", axis=-1)
        target, time_dim = "windows", 1
    out = model.output
    recon = node(
        "Add",
        [node("MatMul", [decoded, const("output_w", out.weight.detach().numpy().T)], "recon_mm"),
         const("output_b", out.bias.detach().numpy())],
        "recon",
    )  # fmt: skip
    diff = node("Sub", [recon, target], "diff")
    squared = node("Mul", [diff, diff], "squared")
    if spec.score_last_steps is not None:
        first = max(w - spec.score_last_steps, 0)
        squared = node(
            "Slice",
            [
                squared,
                const("from", np.array([first], np.int64)),
                const("to", np.array([w], np.int64)),
                axis0 if time_dim == 0 else axis1,
            ],
            "tail",
        )
    node("ReduceMean", [squared], "per_feature", axes=[time_dim], keepdims=0)
    node("ReduceMean", ["per_feature"], "per_window", axes=[1], keepdims=0)

    d = model.output.out_features
    graph = helper.make_graph(
        nodes,
        "recurrent_autoencoder",
        [helper.make_tensor_value_info("windows", TensorProto.FLOAT, ["batch", w, d])],
        [
            helper.make_tensor_value_info("per_window", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("per_feature", TensorProto.FLOAT, ["batch", d]),
        ],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
