"""Typed, frozen configuration loaded from YAML.

`load_config(path)` is the only entry point: it reads the file with a `yaml.SafeLoader` that
also refuses a key given twice, substitutes `${ENV_VAR}` (or `${ENV_VAR:-default}`) anywhere
in a string, validates the whole tree and raises one `ConfigError` listing every problem with its YAML path
(`streams.web.window.size: ...`). Secrets belong in the environment, never in the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from detector.errors import ConfigError

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
# Longest alert history (`alerts.m`) an entity keeps: a day of 20-second samples.
MAX_ALERT_WINDOWS = 4096


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- input -------------------------------------------------------------------------------


class KafkaInput(_Model):
    """Records come from a Kafka topic (consumed by `detector run`)."""

    kind: Literal["kafka"] = Field(description="selects this input")
    topic: str = Field(min_length=1, description="topic to consume; the connection is set under `kafka`")


class FileInput(_Model):
    """Records come from a CSV or JSONL file (used by `detector replay` and `train`)."""

    kind: Literal["file"] = Field(description="selects this input")
    path: Path = Field(description="data file, relative to the config file's folder")
    format: Literal["auto", "csv", "jsonl"] = Field(
        "auto",
        description="`auto` goes by the extension: `.csv`, `.tsv`, `.jsonl`, `.ndjson`, `.json`, each optionally `.gz`",
    )


Input = Annotated[KafkaInput | FileInput, Field(discriminator="kind")]


# --- message mapping ---------------------------------------------------------------------


class Feature(_Model):
    """One model input, in order. A plain string is short for `{name: ...}`."""

    name: str = Field(min_length=1, description="feature name (unique within the stream)")
    field: str | None = Field(None, description="dotted path into the record; `null`: the same as `name`")
    default: float | None = Field(
        None, description="used when the field is missing, null or NaN; without it such a record is rejected"
    )

    @property
    def path(self) -> str:
        return self.field or self.name


class Mapping(_Model):
    """Which record fields are the entity key, the timestamp and the feature values."""

    entity: list[str] = Field(
        default_factory=list,
        description="record fields whose values, joined with `/`, are the entity key (one string is a list of one); "
        "empty: one entity named after the stream",
    )
    timestamp: str | None = Field(
        "timestamp",
        description="record field with the event time; `null` uses the row number (files) or record time (Kafka)",
    )
    timestamp_format: Literal["auto", "iso", "unix_s", "unix_ms"] = Field(
        "auto",
        description="`auto` tells Unix seconds from milliseconds by magnitude and parses ISO 8601 strings; "
        "naive ISO times are UTC",
    )
    features: list[Feature] = Field(min_length=1, description="model inputs, in order (below)")
    out_of_order: Literal["drop", "accept"] = Field(
        "drop", description="a sample older than its entity's newest is rejected (`drop`: counted, reported) or used"
    )
    max_future_s: float | None = Field(
        86_400.0,
        gt=0,
        description="a record whose timestamp is more than this many seconds ahead of the wall clock is rejected "
        "(`future_timestamp`): with `out_of_order: drop`, one far-future sample would make every later sample of "
        "its entity out of order. Checked by `run`, `replay` and `train` alike; `null`: no limit (replaying "
        "synthetic data dated in the future)",
    )

    @field_validator("entity", mode="before")
    @classmethod
    def _entity_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("features", mode="before")
    @classmethod
    def _feature_shorthand(cls, value: Any) -> Any:
        # `features: [cpu, mem]` is the common case; expand it to full entries.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("features")
    @classmethod
    def _unique_names(cls, value: list[Feature]) -> list[Feature]:
        names = [f.name for f in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names: {', '.join(dupes)}")
        return value

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]


# --- windows, normalization, model, training ---------------------------------------------


class Window(_Model):
    """Sliding windows per entity: `size` samples, a window every `stride` samples."""

    size: int = Field(64, ge=2, le=4096, description="samples per window")
    stride: int = Field(1, ge=1, le=4096, description="a window is scored every `stride` samples once `size` are there")
    idle_evict_after_s: float | None = Field(
        None,
        gt=0,
        description="evict an entity once the stream's event time (its newest timestamp) passes the "
        "entity's newest sample by more than this: its window, threshold and alert state are freed (an "
        "open incident gets a `resolved` event with reason `idle`), and if it sends again it starts as a "
        "new entity. Bounds memory when entities come and go. `null`: never. Set it above the longest "
        "normal silence of an entity and above the event-time skew between partitions",
    )

    @model_validator(mode="after")
    def _stride_within_size(self) -> Window:
        # Samples between two windows that far apart are never scored: a blind spot, not a setting.
        if self.stride > self.size:
            raise ValueError(f"stride ({self.stride}) must be <= size ({self.size}): larger leaves samples unscored")
        return self


class TimeOfDay(_Model):
    """Time of day (its sine and cosine) as two more model inputs, so that a value normal in the
    afternoon but not at night, or a daily pattern that skips a day, stands out. Decided at
    training and kept in the checkpoint (see `detector.seasonality`)."""

    use: Literal["auto", "always", "never"] = Field(
        "never",
        description="`auto`: when the training data has a daily rhythm (the median lag-one-day "
        "autocorrelation of its features reaches `min_autocorrelation`); `always`; `never`",
    )
    min_autocorrelation: float = Field(
        0.5, gt=-1.0, le=1.0, description="with `auto`: the daily autocorrelation that counts as a rhythm"
    )
    min_days: float = Field(
        2.0, ge=1.0, description="with `auto`: days of training data an entity needs for its rhythm to be measured"
    )


class TimeOfWeek(_Model):
    """Time of week (its sine and cosine) as two more model inputs, so that a weekend that is
    quieter than the weekdays is expected on weekends. Decided at training and kept in the
    checkpoint (see `detector.seasonality`); it needs weeks of training data."""

    use: Literal["auto", "always", "never"] = Field(
        "never",
        description="`auto`: when the same hour a week earlier predicts the training data better than the "
        "day before by at least `min_gain` (a weekly rhythm); `always`; `never`",
    )
    min_gain: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="with `auto`: the share of the day-to-day change, 1 - var(x[t] - x[t-week]) / "
        "var(x[t] - x[t-day]), that counts as a weekly rhythm",
    )
    min_weeks: float = Field(
        2.0, ge=2.0, description="with `auto`: weeks of training data an entity needs for its rhythm to be measured"
    )


class Normalization(_Model):
    """Scaling fitted on training data and stored in the checkpoint."""

    method: Literal["robust", "standard", "none"] = Field(
        "robust", description="`robust`: (x - median) / IQR; `standard`: z-score; `none`"
    )
    per_entity: bool = Field(
        False, description="fit parameters per entity seen in training; other entities get the population's"
    )
    min_scale: float = Field(
        1e-6, gt=0, description="floor on the fitted scale, so a constant training series does not divide by zero"
    )
    relative_min_scale: float = Field(
        0.0,
        ge=0,
        le=1,
        description="floor on the fitted scale as a fraction of the feature's training magnitude (its range "
        "max - min, or its |center| when larger). A feature that is flat in training but for rare spikes "
        "(IQR 0) gets a scale near 0, so any later movement scores orders of magnitude above every other "
        "feature and dominates the window's error; this floor keeps it comparable. A feature that is exactly "
        "0 in training still falls to `min_scale`. `0`: off",
    )


class ModelSpec(_Model):
    """The recurrent autoencoder's shape."""

    cell: Literal["lstm", "gru", "rnn"] = Field("lstm", description="recurrent cell of encoder and decoder")
    hidden_size: int = Field(32, ge=1, le=4096, description="units per recurrent layer")
    num_layers: int = Field(1, ge=1, le=8, description="stacked recurrent layers")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between stacked layers")
    latent_size: int = Field(16, ge=1, le=4096, description="size of the code a window is compressed to")
    attention: bool = Field(
        False,
        description="decoder attends over encoder states: sharper reconstructions, but it can copy anomalies through",
    )
    ensemble: int = Field(
        1,
        ge=1,
        le=9,
        description="models trained alike from seeds `training.seed`, `seed + 1`, ...; a window's score (and "
        "each feature's error) combines theirs (`ensemble_score`), so one model's quirks do not alert. "
        "Training and scoring cost this many times one model's",
    )
    ensemble_score: Literal["mean", "median"] = Field(
        "mean",
        description="how an ensemble's members' errors combine into a window's score: `mean`, or `median` (of an "
        "odd count: one member's score). NAB, three models: mean 71.3 / 73.0, median 70.4 / 73.9 standard on "
        "training seeds 0-4 / 5-9, a tie over ten; five models by their mean 72.3 / 73.6 (docs/results.md, round 13)",
    )
    score_last_steps: int | None = Field(
        None,
        ge=1,
        description="score a window by the error of its last N steps only (`null`: all steps). One odd "
        "record (a payment) is diluted by the mean over the whole window; the newest steps say what just "
        "changed. At most `window.size`; thresholds fitted in training use the same score",
    )

    @model_validator(mode="after")
    def _odd_for_median(self) -> ModelSpec:
        if self.ensemble_score == "median" and self.ensemble % 2 == 0:
            raise ValueError(
                f"ensemble must be odd with ensemble_score median (got {self.ensemble}): the median of an "
                "even count is no model's score"
            )
        return self


class Training(_Model):
    """How `detector train` fits the model (AdamW, early stopping on held-out windows)."""

    epochs: int = Field(30, ge=1, le=10_000, description="most passes over the training windows")
    batch_size: int = Field(64, ge=1, description="windows per optimisation step")
    learning_rate: float = Field(2e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; `null` disables")
    validation_split: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="latest fraction of each entity's windows held out, at least one (with a gap so none overlaps "
        "training, when the entity has windows to spare); training needs at least 4 windows left",
    )
    early_stopping_patience: int = Field(
        5, ge=0, description="epochs without validation improvement before stopping; 0 disables"
    )
    seed: int = Field(0, description="same data + seed = same model")
    stride: int = Field(1, ge=1, description="training windows are taken every `stride` samples")
    max_windows: int = Field(50_000, ge=16, description="at most this many training windows (sampled)")
    trim_fraction: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="fraction of each batch's worst-reconstructed windows left out of the loss, so anomalies in "
        "the history are not learned as normal",
    )


# --- thresholds and alerts ---------------------------------------------------------------


class StaticRule(_Model):
    """A fixed score threshold."""

    rule: Literal["static"] = Field(description="selects this rule")
    value: float = Field(ge=0, description="the threshold")


class QuantileRule(_Model):
    """A quantile of the held-out validation errors (stored in the checkpoint), times `factor`."""

    rule: Literal["quantile"] = Field(description="selects this rule")
    q: float = Field(gt=0, lt=1, description="quantile of the validation errors")
    factor: float = Field(1.0, gt=0, description="multiplies the quantile")


class SigmaRule(_Model):
    """The held-out validation errors' mean + `k`·std (from the checkpoint): a fixed threshold
    that a dynamic rule's population threshold also uses, without per-entity learning.
    For scores whose normal range the held-out windows already show (many metrics of one
    host, scored by their newest step: `configs/server-metrics.yaml`)."""

    rule: Literal["sigma"] = Field(description="selects this rule")
    k: float = Field(gt=0, description="standard deviations of the validation errors above their mean")


class PotRule(_Model):
    """Peaks over threshold (extreme value theory, the fixed form of SPOT, Siffer et al., KDD
    2017): a generalized Pareto distribution is fitted to the held-out validation errors
    (from the checkpoint) above their `level` quantile, and the threshold is the score that
    distribution says a normal window exceeds with probability `q`. Unlike `quantile`, it
    reaches past the largest held-out error when `q` is below one over their number. The fit
    needs 10 errors above the `level` quantile (500 held-out windows at 0.98); with fewer, the
    largest held-out error is the threshold and a warning says so, except after a retraining,
    whose smaller held-out sample keeps the previous threshold scaled by the new model's error
    ratio."""

    rule: Literal["pot"] = Field(description="selects this rule")
    q: float = Field(
        1e-4, gt=0, lt=1, description="risk: the probability that a normal window scores above the threshold"
    )
    level: float = Field(
        0.98, ge=0.5, lt=1, description="quantile of the validation errors where the fitted tail starts"
    )

    @model_validator(mode="after")
    def _risk_in_tail(self) -> PotRule:
        if self.q >= 1 - self.level:
            raise ValueError(f"q {self.q:g} must be below 1 - level ({1 - self.level:g}): the tail starts there")
        return self


class DynamicRule(_Model):
    """mean + k·std of each entity's own recent normal scores (EWMA or a rolling window), or
    median + k·1.4826·MAD of a rolling window (`median`, robust to heavy-tailed scores).

    Until an entity has `warmup` scores, the population threshold from the training
    errors (validation mean + k·std) applies. Scores above the threshold do not update the
    statistics, so a short anomaly does not teach the rule that it is normal; with
    `regime_after`, a run of that many does (a regime change: the statistics restart from
    the run's scores).

    The defaults are the settings that scored best on NAB (docs/results.md, rounds 2 and 12:
    a long memory, a regime change after about 6 hours at 5-minute sampling, a floor at 1.5
    times the centre); configs/system-metrics.yaml spells them out.
    """

    rule: Literal["dynamic"] = Field(description="selects this rule")
    method: Literal["ewma", "rolling", "median"] = Field(
        "ewma",
        description="`ewma` (uses `alpha`) or `rolling` (uses `window`): mean + `k`·std; "
        "`median` (uses `window`): median + `k`·1.4826·MAD of the last `window` normal scores",
    )
    k: float = Field(4.0, gt=0, description="spreads (std or scaled MAD) above the centre")
    alpha: float = Field(
        0.0005,
        gt=0,
        le=1,
        description="EWMA weight of each new score (`ewma`); the first 1/`alpha` scores are averaged plainly",
    )
    window: int = Field(500, ge=2, le=100_000, description="normal scores kept (`rolling`, `median`)")
    warmup: int = Field(
        100,
        ge=0,
        description="an entity's scores before its own statistics apply; until then, the population threshold",
    )
    regime_after: int | None = Field(
        70,
        ge=1,
        le=100_000,
        description="after this many anomalous windows in a row, a regime change: the entity's statistics restart "
        "from those windows' scores, so a persistent new level stops alerting and the alert can resolve; "
        "`null`: never",
    )
    winsorize: float | None = Field(
        None,
        gt=0,
        description="once warm, a normal score updates the statistics as at most mean + `winsorize`·std, so large "
        "errors below a larger threshold do not inflate it; `null`: off",
    )
    min_ratio: float | None = Field(
        1.5,
        gt=1,
        description="the threshold is at least this many times the centre (mean, or median) of the scores it is "
        "computed from, so an entity whose scores barely vary does not alert on a small rise; `null`: off",
    )


Rule = Annotated[StaticRule | QuantileRule | SigmaRule | PotRule | DynamicRule, Field(discriminator="rule")]


class Thresholds(_Model):
    """A score above `warning` is anomalous; above `critical` too, it is critical. Each is a
    rule: `static`, `quantile`, `sigma`, `pot` or `dynamic` (below); the two may be of different kinds."""

    warning: Rule = Field(
        default_factory=lambda: QuantileRule(rule="quantile", q=0.995), description="rule for an anomalous window"
    )
    critical: Rule | None = Field(
        None,
        description="rule for a critical one; `null`: none. Refused when provably never above `warning` (same rule "
        "with comparable parameters: a lower or equal static `value`; `q` and `factor` both lower or equal; a lower or "
        "equal sigma `k`; a pot `q` as high or higher at the same `level`; the same dynamic statistics with a lower or "
        "equal `k`, or a lower `min_ratio`). Mixed rule kinds (e.g. quantile warning, static critical) are allowed and "
        "not checked",
    )

    @field_validator("critical")
    @classmethod
    def _critical_above_warning(cls, c: Rule | None, info: ValidationInfo) -> Rule | None:
        """Reject only a critical rule that can never be above the warning rule.

        That is provable only for two rules of the same kind with comparable parameters; a
        mixed pair (say, a quantile warning and a static critical) is allowed: which one is
        higher depends on the trained model's errors.
        """
        w = info.data.get("warning")  # absent when the warning rule itself is invalid
        if isinstance(w, StaticRule) and isinstance(c, StaticRule) and c.value <= w.value:
            raise ValueError(f"critical value {c.value:g} must be above the warning value {w.value:g}")
        if isinstance(w, QuantileRule) and isinstance(c, QuantileRule) and c.q <= w.q and c.factor <= w.factor:
            # Quantiles grow with q, and errors are >= 0, so a lower or equal q and factor is never higher.
            raise ValueError(
                f"critical (q {c.q:g}, factor {c.factor:g}) is never above warning (q {w.q:g}, factor "
                f"{w.factor:g}); raise the critical q or factor"
            )
        if isinstance(w, SigmaRule) and isinstance(c, SigmaRule) and c.k <= w.k:
            raise ValueError(f"critical k {c.k:g} must be above the warning k {w.k:g}")
        if isinstance(w, PotRule) and isinstance(c, PotRule) and c.level == w.level and c.q >= w.q:
            raise ValueError(
                f"critical q {c.q:g} must be below the warning q {w.q:g} (a smaller risk is a higher score)"
            )
        if isinstance(w, DynamicRule) and isinstance(c, DynamicRule) and _same_statistics(w, c):
            if c.k <= w.k:
                raise ValueError(f"critical k {c.k:g} must be above the warning k {w.k:g} (same {c.method} statistics)")
            if (c.min_ratio or 1.0) < (w.min_ratio or 1.0):
                # Where the warning's floor binds, a lower critical floor would put critical below warning.
                raise ValueError(
                    f"critical min_ratio {c.min_ratio} must be at least the warning min_ratio {w.min_ratio:g} "
                    f"(same {c.method} statistics)"
                )
        return c


def _same_statistics(a: DynamicRule, b: DynamicRule) -> bool:
    """Whether two dynamic rules track the same mean and std (then only `k` differs)."""
    smoothing = a.alpha == b.alpha if a.method == "ewma" else a.window == b.window
    same = (a.warmup, a.regime_after, a.winsorize) == (b.warmup, b.regime_after, b.winsorize)
    return a.method == b.method and smoothing and same


class DailyRepeats(_Model):
    """An anomalous window whose score the entity already reached at about the same time of day
    a day earlier (or `days` earlier) raises no alert: a nightly backup's or batch job's spike is
    a habit, not an incident. Each entity keeps the highest score of each `bin_s` of event time
    over the last max(`days`) days; a window is a repeat when the highest of the three bins
    around its time of day, on one of those days, is at least `ratio` times its score. Repeats
    still count as anomalous for the thresholds (they do not learn from them), and
    `detector_daily_repeats_total` counts them."""

    ratio: float = Field(
        0.8,
        gt=0,
        le=10,
        description="yesterday's highest score near this time of day, over this score, that is a repeat",
    )
    bin_s: int = Field(
        1800,
        ge=60,
        le=21_600,
        description="width of the bins of event time (a divisor of a day); the three around the time of day "
        "cover 1.5 to 3 bins, 45-90 minutes at the default",
    )

    days: list[int] = Field(
        [1],
        min_length=1,
        description="days back to compare with, each at the same time of day (`[1, 7]`: yesterday and a "
        "week ago, for a weekly job); the state is max(days) x 86400 / bin_s bins per entity",
    )

    @field_validator("days")
    @classmethod
    def _days_back(cls, days: list[int]) -> list[int]:
        if any(d < 1 or d > 28 for d in days) or len(set(days)) != len(days):
            raise ValueError(f"give distinct whole days from 1 to 28 (got {days})")
        return sorted(days)

    @field_validator("bin_s")
    @classmethod
    def _divides_a_day(cls, bin_s: int) -> int:
        if 86_400 % bin_s:
            raise ValueError(f"must divide a day, 86400 s (got {bin_s})")
        return bin_s


class AlertPolicy(_Model):
    """Fire after `n` anomalous windows among the last `m`; resolve after `resolve_after`
    normal windows in a row; after a resolve, stay quiet for `cooldown_s` of event time
    unless the entity gets worse than the incident that resolved (a higher severity, or a
    score `cooldown_breakout` times its highest).

    A short `m` reacts within a few windows; a long one (hundreds of windows) fires on a
    sustained rise in the rate of anomalous windows, which catches long, moderate
    anomalies with far fewer false alarms, at the cost of at least `n` windows of delay.
    """

    n: int = Field(3, ge=1, le=MAX_ALERT_WINDOWS, description="anomalous windows among the last `m` that fire (n ≤ m)")
    m: int = Field(5, ge=1, le=MAX_ALERT_WINDOWS, description="windows the `n`-of-`m` rule looks back over")
    cooldown_s: float = Field(
        300.0, ge=0, description="after a resolve, event-time seconds before the entity may fire again"
    )
    resolve_after: int | None = Field(
        None, ge=1, description="normal windows in a row that resolve a firing alert; `null`: `m`"
    )
    cooldown_breakout: float | None = Field(
        None,
        gt=1,
        description="during a cooldown, a window scoring at least this many times the highest score of the incident "
        "that resolved fires anyway (a higher severity always does); `null`: only severity",
    )
    top_features: int = Field(3, ge=1, description="contributing features listed in each alert")
    daily_repeats: DailyRepeats | None = Field(
        None,
        description="anomalous windows that repeat yesterday's at the same time of day raise no alert; `null`: off",
    )

    @model_validator(mode="after")
    def _n_within_m(self) -> AlertPolicy:
        if self.n > self.m:
            raise ValueError(f"n ({self.n}) must be <= m ({self.m})")
        return self

    @property
    def resolve_windows(self) -> int:
        return self.resolve_after or self.m


class Retraining(_Model):
    """Continuous fine-tuning of the stream's model on recent normal windows.

    Windows scored normal go into a bounded reservoir (recent-biased: once full, each new
    window replaces a random one), leaving out anomalous windows and `exclude_neighbours`
    windows of the same entity on either side of them. Every `every_windows` scored windows
    and/or `interval_s` of event time, a copy of the model is fine-tuned on the reservoir
    (in a background thread under `detector run`; in line, at a batch boundary, under
    `detector replay`, so replays are reproducible), and kept only when its mean
    reconstruction error on a held-out recent sample is at most (1 + `tolerance`) times the
    current model's. The scoring loop swaps it in between batches, keeping windows and alert
    state; thresholds are refitted from the new model's errors on the held-out sample.
    """

    enabled: bool = Field(False, description="fine-tune the model on recent normal windows")
    every_windows: int | None = Field(
        5000, ge=1, description="retrain after this many scored windows (of all entities); `null`: only by time"
    )
    interval_s: float | None = Field(
        None, gt=0, description="retrain after this many seconds of event time; `null`: only by window count"
    )
    reservoir_size: int = Field(2048, ge=16, le=1_000_000, description="normal windows kept to train on")
    min_windows: int = Field(
        256, ge=8, description="no retraining until the reservoir holds this many windows (at most `reservoir_size`)"
    )
    epochs: int = Field(3, ge=1, le=1000, description="passes over the reservoir per retraining")
    learning_rate: float = Field(5e-4, gt=0, description="AdamW learning rate of the fine-tuning")
    batch_size: int = Field(64, ge=1, description="windows per optimisation step")
    validation_fraction: float = Field(
        0.2, gt=0, lt=1, description="the most recent fraction of the reservoir, held out to validate candidates"
    )
    exclude_anomalous: bool = Field(True, description="keep anomalous windows out of the reservoir")
    exclude_neighbours: int = Field(
        16,
        ge=0,
        description="also keep out this many windows of the entity before and after each anomalous one (their "
        "overlap with the anomaly, and its onset before the score crossed the threshold)",
    )
    tolerance: float = Field(
        0.05,
        ge=0,
        description="a candidate is kept when its held-out mean error is at most (1 + `tolerance`) times the "
        "current model's on the same windows",
    )
    threads: int = Field(
        1,
        ge=1,
        le=256,
        description="torch intra-op threads of the fine-tuning. `detector run` fine-tunes in a separate, "
        "lower-priority process, so scoring keeps the other cores (1 leaves all but one to scoring)",
    )
    seed: int = Field(0, description="seeds the reservoir's sampling and the fine-tuning's batch order")

    @model_validator(mode="after")
    def _has_trigger(self) -> Retraining:
        if self.enabled and self.every_windows is None and self.interval_s is None:
            raise ValueError("retraining needs `every_windows` or `interval_s`")
        return self


class RegimeChange(_Model):
    """An entity anomalous for long enough is in a new regime, not in an endless incident.

    When an entity's open incident has lasted `after_windows` of its windows or `after_s` of
    event time, the incident ends with one `regime_change` event (sinks get it like a
    resolve: it names the firing ids it ends). The entity's normalization is re-centred on
    its recent values (the mean of its windows during the incident, leaving out those that
    straddle its onset), its threshold statistics restart, and its next
    `calibration_windows` windows, which raise no alert, calibrate its thresholds: when their
    median score is above the median of the model's held-out errors, the entity's thresholds
    are scaled up by that ratio. Unlike a dynamic rule's `regime_after` (a quiet restart of
    that rule's statistics), this ends the incident visibly and covers every rule kind.
    """

    after_windows: int | None = Field(
        None, ge=1, description="incident length, in the entity's windows, that is a regime change; `null`: never"
    )
    after_s: float | None = Field(
        None, gt=0, description="incident length, in seconds of event time, that is a regime change; `null`: never"
    )
    calibration_windows: int = Field(
        32, ge=1, le=100_000, description="windows after a regime change that calibrate the entity's thresholds"
    )

    @property
    def enabled(self) -> bool:
        return self.after_windows is not None or self.after_s is not None


class ColdStart(_Model):
    """A new entity is scored with the stream's shared model and population thresholds until
    it has `warmup_windows` windows of its own; its alerts say `cold_start: true` until then."""

    warmup_windows: int = Field(
        0,
        ge=0,
        description="an entity's scored windows before its own threshold statistics apply (a dynamic rule also "
        "waits for its `warmup` normal scores, and an entity on its population threshold is cold too); 0: only that",
    )


# --- stream and file ---------------------------------------------------------------------


class Stream(_Model):
    """One monitored stream: where records come from and how they become alerts. Its name
    (the key under `streams`) is letters, digits, `_`, `.` and `-`."""

    input: Input = Field(description="where records come from: `kind: kafka` or `kind: file` (below)")
    mapping: Mapping = Field(description="how a record becomes entity, timestamp and feature values")
    window: Window = Field(default_factory=Window, description="how samples are cut into windows")
    time_of_day: TimeOfDay = Field(default_factory=TimeOfDay, description="time of day as model input")
    time_of_week: TimeOfWeek = Field(default_factory=TimeOfWeek, description="time of week as model input")
    normalization: Normalization = Field(default_factory=Normalization, description="feature scaling")
    model: ModelSpec = Field(default_factory=ModelSpec, description="the autoencoder's shape")
    training: Training = Field(default_factory=Training, description="how `detector train` fits the model")
    thresholds: Thresholds = Field(default_factory=Thresholds, description="score → severity rules")
    alerts: AlertPolicy = Field(default_factory=AlertPolicy, description="when anomalous windows become an alert")
    checkpoint: Path | None = Field(
        None, description="model file the stream scores with (relative to the config file's folder)"
    )
    retraining: Retraining = Field(
        default_factory=Retraining, description="continuous fine-tuning on recent normal windows"
    )
    regime: RegimeChange = Field(
        default_factory=RegimeChange, description="when a long incident is a change of regime instead"
    )
    cold_start: ColdStart = Field(default_factory=ColdStart, description="how new entities are scored")
    model_store: Path | None = Field(
        None,
        description="directory of versioned checkpoints; the stream scores with its promoted version, and SIGHUP "
        "picks up a newly promoted one (relative to the config file's folder; not together with `checkpoint`)",
    )

    @model_validator(mode="after")
    def _one_model_source(self) -> Stream:
        # Either would be a silent winner: say which one the stream scores with instead.
        if self.checkpoint is not None and self.model_store is not None:
            raise ValueError("give `checkpoint` or `model_store`, not both")
        return self

    @model_validator(mode="after")
    def _retraining_one_model(self) -> Stream:
        if self.retraining.enabled and self.model.ensemble > 1:
            raise ValueError(
                f"retraining.enabled fine-tunes one model; model.ensemble is {self.model.ensemble} "
                "(set it to 1, or retrain offline with `detector train`)"
            )
        return self

    @model_validator(mode="after")
    def _score_steps_within_window(self) -> Stream:
        steps = self.model.score_last_steps
        if steps is not None and steps > self.window.size:
            raise ValueError(f"model.score_last_steps ({steps}) must be <= window.size ({self.window.size})")
        return self

    def layout_hash(self) -> str:
        """Hash of everything a trained model depends on (features, window, scaling, model).

        Thresholds and alert policy are left out: changing them needs no retraining.
        """
        model = self.model.model_dump()
        normalization = self.normalization.model_dump()
        if normalization["relative_min_scale"] == 0:
            # Added later: leaving it out when unset keeps the hashes of earlier checkpoints valid.
            del normalization["relative_min_scale"]
        if model["score_last_steps"] is None:
            # Added later: leaving it out when unset keeps the hashes of earlier checkpoints valid.
            del model["score_last_steps"]
        if model["ensemble"] == 1:
            del model["ensemble"]  # added later, likewise
        if model["ensemble_score"] == "median" or "ensemble" not in model:
            # Added later, and irrelevant to one model: ensembles from before it combined by the
            # median, so their hashes stay valid for it (and a mean-combined config retrains them).
            del model["ensemble_score"]
        parts = {
            "features": self.mapping.feature_names,
            "window": self.window.model_dump(exclude={"idle_evict_after_s"}),  # the model does not depend on it
            "normalization": normalization,
            "model": model,
        }
        if self.time_of_day.use != "never":
            # Added later: leaving it out when unset keeps the hashes of earlier checkpoints valid.
            parts["time_of_day"] = self.time_of_day.model_dump()
        if self.time_of_week.use != "never":
            parts["time_of_week"] = self.time_of_week.model_dump()
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class Scoring(_Model):
    """How scoring uses the CPU."""

    engine: Literal["torch", "onnxruntime"] = Field(
        "onnxruntime",
        validate_default=True,  # the default needs its packages too: say so at load, not at the first batch
        description="what runs the model: `torch`, or the same network and weights in ONNX Runtime (the "
        "onnxruntime and onnx packages), 1.1-2.4x torch's windows/s on 2 cores here (docs/performance.md); "
        "scores agree to float32 rounding. Training always uses torch",
    )
    threads: int | None = Field(
        None, ge=1, le=256, description="intra-op threads of the scoring engine (and torch's); `null`: all cores"
    )

    @field_validator("engine")
    @classmethod
    def _engine_installed(cls, engine: str) -> str:
        if engine == "onnxruntime":
            missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
            if missing:
                raise ValueError(f"onnxruntime needs the {' and '.join(missing)} package(s): install them or use torch")
        return engine

    batch_windows: int = Field(
        256,
        ge=1,
        description="windows per forward pass; scores do not depend on it. 256 measured fastest here on 2 "
        "threads (bigger passes fall out of cache); on 1 thread, 32 is 10-15% faster with onnxruntime "
        "(docs/performance.md)",
    )
    batch_records: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="`detector run`: a micro-batch closes at `batch_records` records (each completes at most one "
        "window, so this also bounds the windows) or `batch_wait_ms` after its first record, whichever comes "
        "first; offsets are committed once per batch",
    )
    batch_wait_ms: int = Field(
        200,
        ge=1,
        le=600_000,
        description="`detector run`: the longest a micro-batch waits after its first record (counted from when the "
        "previous batch began processing, for records that arrived meanwhile)",
    )


# --- the daemon (`detector run`) ---------------------------------------------------------


class Kafka(_Model):
    """Kafka client settings for `detector run` (one consumer group, one producer).

    Secrets (`sasl_plain_password`, `ssl_password`) belong in `${ENV}`. Settings not listed
    here pass through `consumer_options` / `producer_options` to kafka-python unchanged.
    """

    bootstrap_servers: list[str] = Field(
        default_factory=lambda: ["localhost:9092"],
        min_length=1,
        description="brokers: a list, or one comma-separated string",
    )
    group_id: str = Field(
        "detector", min_length=1, description="consumer group; offsets are committed there, never automatically"
    )
    client_id: str = Field("detector", min_length=1, description="client name the brokers see")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest",
        description="where a group with no committed offset starts. Not `latest` on Tansu (the local broker): its "
        "latest-offset lookup answers wrong offsets, so the group may start far from the end; the daemon itself "
        "never asks for the latest offset (lag comes from the fetch high watermark)",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="transport security"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = Field(
        None, description="SASL login mechanism"
    )
    sasl_plain_username: str | None = Field(None, description="SASL user name")
    sasl_plain_password: str | None = Field(None, description="SASL password; put it in `${ENV}`")
    ssl_cafile: Path | None = Field(None, description="CA bundle (relative to the config file's folder)")
    ssl_certfile: Path | None = Field(None, description="client certificate (relative to the config file's folder)")
    ssl_keyfile: Path | None = Field(None, description="client key (relative to the config file's folder)")
    ssl_password: str | None = Field(None, description="client key password; put it in `${ENV}`")
    fetch_min_bytes: int = Field(1, ge=1, description="fetch size, as in kafka-python")
    fetch_max_bytes: int = Field(52_428_800, ge=1, description="fetch size (50 MiB), as in kafka-python")
    max_partition_fetch_bytes: int = Field(
        1_048_576, ge=1, description="fetch size per partition (1 MiB), as in kafka-python"
    )
    fetch_max_wait_ms: int = Field(
        100,
        ge=0,
        description="how long the broker may hold a fetch waiting for `fetch_min_bytes`: bounds the latency of a "
        "quiet stream. The local Tansu broker answers a fetch with no records when reading takes longer than this, "
        "and its reads slow down as a partition holds more batches: below about 100 ms a long run against it can "
        "stop consuming (the daemon warns after 60 s without progress); Apache Kafka has no such limit",
    )
    max_poll_records: int = Field(500, ge=1, description="records per poll, as in kafka-python")
    session_timeout_ms: int = Field(45_000, ge=1000, description="group membership timeout")
    heartbeat_interval_ms: int = Field(
        3_000, ge=100, description="group heartbeat; at most a third of `session_timeout_ms`"
    )
    request_timeout_ms: int = Field(30_000, ge=1000, description="broker request timeout")
    reconnect_backoff_max_ms: int = Field(
        1000,
        ge=50,
        description="longest wait between reconnection attempts to a broker that went away; low, so that "
        "consumption resumes within seconds of a broker outage (kafka-python's own default is 30 s)",
    )
    consumer_options: dict[str, Any] = Field(
        default_factory=dict, description="any other kafka-python `KafkaConsumer` setting, passed through unchanged"
    )
    producer_options: dict[str, Any] = Field(
        default_factory=dict, description="any other kafka-python `KafkaProducer` setting, passed through unchanged"
    )
    dead_letter_topic: str | None = Field(
        None,
        min_length=1,
        description="records that cannot be decoded go here unchanged, with headers naming the reason and the "
        "source; `null`: they are only counted and logged",
    )
    refill_records: int = Field(
        10_000,
        ge=0,
        description="on partition assignment, records re-read before the committed offset to refill windows and "
        "alert state (scored, never alerted); enough for every entity of a partition to see `window.size` + "
        "`alerts.m` times `window.stride` samples leaves no blind spot after a restart",
    )
    alert_dedup_lookback: int = Field(
        10_000,
        ge=0,
        le=1_000_000,
        description="on partition assignment, alert messages read back from the end of each partition of the "
        "alerts topic (`sinks.kafka.topic`); the Kafka sink does not send again an alert whose id is among them "
        "(`detector_alerts_deduplicated_total`), so a restart after a crash between an alert's delivery and its "
        "offset commit does not put it on the topic twice. Sound within this bound: if more alert messages than "
        "this reached a partition between the first copy and the reassignment, the re-send is not caught. The ids "
        "are held in memory (about 110 bytes each) until the next assignment; 0: no read back (at least once)",
    )

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _servers_as_list(cls, value: Any) -> Any:
        return [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> Kafka:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        return self


class Retry(_Model):
    """Delivery retries of a sink: exponential backoff from `initial_backoff_s`, doubling up to
    `max_backoff_s`, `max_attempts` tries in all (or until delivered), each with a `timeout_s`
    request timeout. A 4xx answer other than 429 is not retried."""

    initial_backoff_s: float = Field(0.5, gt=0, description="wait before the first retry, in seconds")
    max_backoff_s: float = Field(30.0, gt=0, description="longest wait between tries, in seconds")
    max_attempts: int | None = Field(
        12,
        ge=1,
        description="tries in all, the first included (the default spans about 3 minutes of outage); `null`: "
        "retry until delivered. A sink with `delivery: confirmed` never gives up on a retryable failure",
    )
    timeout_s: float = Field(5.0, gt=0, description="timeout of each request, in seconds")


def _environment_variable_set(cls: type, name: str | None) -> str | None:
    """The variable must be set when the config is loaded: a sink without its token would only
    fail (401) at the first alert."""
    if name is not None and name not in os.environ:
        raise ValueError(f"environment variable {name} is not set")
    return name


def _one_authorization_header(sink: Any) -> Any:
    if sink.bearer_token_env is not None and any(h.lower() == "authorization" for h in sink.headers):
        raise ValueError("set either `bearer_token_env` or an Authorization header, not both")
    return sink


# Fields both HTTP sinks have, written once (a shared base class would move them to the top of
# the generated reference, away from the fields they go with).
_QueueSize = Annotated[
    int,
    Field(
        ge=1,
        description="deliveries waiting; when full, new alerts are dropped, counted "
        '(`detector_sink_dropped_total{cause="queue_full"}`) and logged; with `delivery: confirmed`, the daemon '
        "waits for room instead",
    ),
]
_BearerTokenEnv = Annotated[
    str | None,
    Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="name of the environment variable holding a bearer token, sent as `Authorization: Bearer "
        "<token>`; the token itself never goes in the file, and a variable that is not set is a config error",
    ),
]
_Delivery = Annotated[
    Literal["queued", "confirmed"],
    Field(
        description="`queued`: offsets are committed once alerts are queued; a full queue drops (and counts) new "
        "alerts, and consumption never waits for the receiver. `confirmed`: offsets are committed only past alerts "
        "the receiver acknowledged, so a restart re-sends what was not; a full queue makes the daemon wait",
    ),
]


class WebhookSinkConfig(_Model):
    """A generic JSON webhook: each batch's alert events are POSTed to `url` as a JSON array."""

    url: str = Field(pattern=r"^https?://", description="where to POST")
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra HTTP headers, e.g. `Authorization: Bearer ${TOKEN}`"
    )
    queue_size: _QueueSize = 1000
    bearer_token_env: _BearerTokenEnv = None
    delivery: _Delivery = "queued"
    retry: Retry = Field(default_factory=Retry, description="delivery retries (below)")

    _token_set = field_validator("bearer_token_env")(_environment_variable_set)
    _one_authorization = model_validator(mode="after")(_one_authorization_header)


class AlertmanagerSinkConfig(_Model):
    """An Alertmanager API v2 receiver: alerts are POSTed to `url`/api/v2/alerts; active alerts
    are re-sent every `resend_interval_s`, and a resolve is sent with `endsAt`."""

    url: str = Field(pattern=r"^https?://", description="Alertmanager base URL; `/api/v2/alerts` is appended")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers")
    alertname: str = Field("AnomalyDetected", min_length=1, description="the `alertname` label")
    labels: dict[str, str] = Field(
        default_factory=dict, description="extra labels on every alert (team, environment, ...)"
    )
    resend_interval_s: float = Field(60.0, gt=0, description="seconds between re-sends of an active alert")
    generator_url: str | None = Field(None, description="the alerts' `generatorURL`")
    queue_size: _QueueSize = 1000
    bearer_token_env: _BearerTokenEnv = None
    delivery: _Delivery = "queued"
    retry: Retry = Field(default_factory=Retry, description="delivery retries (below)")

    _token_set = field_validator("bearer_token_env")(_environment_variable_set)
    _one_authorization = model_validator(mode="after")(_one_authorization_header)


class KafkaSinkConfig(_Model):
    """Alerts as JSON messages on a Kafka topic, keyed by entity."""

    topic: str = Field(min_length=1, description="alerts topic: one JSON message per alert event")


class Sinks(_Model):
    """Where `detector run` sends alerts. Every sink gets every alert event."""

    log: bool = Field(True, description="each alert as a JSON line on the `detector.alerts` logger")
    kafka: KafkaSinkConfig | None = Field(None, description="alerts topic (below); `null`: none")
    alertmanager: list[AlertmanagerSinkConfig] = Field(
        default_factory=list, description="Alertmanager API v2 receivers (below)"
    )
    webhooks: list[WebhookSinkConfig] = Field(default_factory=list, description="generic JSON webhooks (below)")
    scores_file: Path | None = Field(
        None,
        description="every scored record as a JSON line (stream, topic, partition, offset, entity, timestamp, "
        "score, threshold, severity, alert_id): audits, debugging, the equivalence tests",
    )


class Server(_Model):
    """The HTTP endpoints of `detector run`: `/metrics`, `/-/healthy`, `/-/ready`, `POST /-/reload`."""

    enabled: bool = Field(True, description="serve the endpoints")
    host: str = Field(
        "127.0.0.1",
        description="listen address; loopback unless told otherwise: a container or pod sets `0.0.0.0` so the "
        "scraper can reach it",
    )
    port: int = Field(9108, ge=0, le=65535, description="listen port")


class Service(_Model):
    """Lifecycle of `detector run`."""

    grace_period_s: float = Field(
        30.0,
        gt=0,
        description="on SIGTERM/SIGINT, seconds to finish the batch, commit and flush the sinks before a forced "
        "exit (code 1)",
    )


class Config(_Model):
    """The whole file: one or more streams and the settings they share."""

    streams: dict[Annotated[str, Field(pattern=_NAME_PATTERN)], Stream] = Field(
        min_length=1, description="one entry per stream: its name (letters, digits, `_` `.` `-`) and its settings"
    )
    # Validated from {} rather than built by a factory, so a default that fails (scoring.engine's
    # packages missing) is reported under its YAML path like any other value.
    scoring: Scoring = Field(
        default_factory=dict,
        validate_default=True,
        description="how scoring uses the CPU",
    )
    kafka: Kafka = Field(default_factory=Kafka, description="Kafka client of `detector run`")
    sinks: Sinks = Field(default_factory=Sinks, description="where `detector run` sends alerts")
    server: Server = Field(default_factory=Server, description="HTTP endpoints of `detector run`")
    service: Service = Field(default_factory=Service, description="lifecycle of `detector run`")

    def stream(self, name: str | None) -> tuple[str, Stream]:
        """The named stream, or the only one when `name` is None."""
        if name is None:
            if len(self.streams) != 1:
                raise ConfigError("--stream", [f"several streams configured, pick one of: {', '.join(self.streams)}"])
            return next(iter(self.streams.items()))
        if name not in self.streams:
            raise ConfigError("--stream", [f"no stream named {name!r}; configured: {', '.join(self.streams)}"])
        return name, self.streams[name]


# --- loading -----------------------------------------------------------------------------


def _interpolate(node: Any, path: str, problems: list[str], secret_paths: set[str]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, str(k)), problems, secret_paths) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, _join(path, i), problems, secret_paths) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name, default)
        if value is None:
            problems.append(f"{path or '<root>'}: environment variable {name} is not set")
            return ""
        return value

    secret_paths.add(path)
    return _ENV_PATTERN.sub(substitute, node)


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _yaml_path(data: Any, loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into the path a user sees in the YAML file.

    Pydantic puts union tags (e.g. `quantile`) into the location; they are not keys in the
    file, so walk the data and drop location parts that do not exist there.
    """
    path, node = "", data
    for part in loc:
        if part == "[key]":
            continue  # pydantic's marker for "the dict key itself is invalid": the path names it already
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict:
            # str(): a YAML key like `1:` is a dict key, not a list index.
            path, node = _join(path, str(part)), node[part]
        elif in_list:
            path, node = _join(path, part), node[part]
        elif isinstance(node, dict) and part in (node.get("kind"), node.get("rule")):
            continue  # a union tag: stay on the same node
        else:
            # A key the file lacks (the error is about it being missing) or a list index past the end.
            path, node = _join(path, part), None
    return path or "<root>"


class _StrictSafeLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that a key given twice in one mapping is an error: PyYAML would
    silently keep the last one, so half of a duplicated section would be ignored unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges are meant to be overridden
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base loader reports it
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    f"in the mapping at line {node.start_mark.line + 1}",
                    node.start_mark,
                    f"duplicate key {key!r} (first at line {first})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> tuple[Config, set[str]]:
    """Validate YAML text. Returns the config and the YAML paths filled from the environment."""
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)  # a SafeLoader: Python tags are refused
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, ["<root>: expected a mapping with a `streams` key"])
    problems: list[str] = []
    secret_paths: set[str] = set()
    data = _interpolate(data, "", problems, secret_paths)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                # Point at the tag key itself (`input.kind`), not at the whole mapping.
                loc = (*loc, str(err.get("ctx", {}).get("discriminator", "")).strip("'"))
            problems.append(f"{_yaml_path(data, loc)}: {err['msg']}")
    if problems:
        raise ConfigError(source, problems)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config, secret_paths


def load_config(path: str | Path) -> Config:
    """Read, interpolate and validate a YAML config; relative paths are taken from its folder."""
    return load_config_with_secrets(path)[0]


def load_config_with_secrets(path: str | Path) -> tuple[Config, set[str]]:
    """Like `load_config`, also returning the YAML paths whose values came from `${ENV}`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    return parse_config(text, str(path), path.parent)


def _resolve_paths(config: Config, base: Path) -> Config:
    streams = {}
    for name, stream in config.streams.items():
        update: dict[str, Any] = {}
        if stream.checkpoint is not None and not stream.checkpoint.is_absolute():
            update["checkpoint"] = base / stream.checkpoint
        if stream.model_store is not None and not stream.model_store.is_absolute():
            update["model_store"] = base / stream.model_store
        if isinstance(stream.input, FileInput) and not stream.input.path.is_absolute():
            update["input"] = stream.input.model_copy(update={"path": base / stream.input.path})
        streams[name] = stream.model_copy(update=update)
    kafka_files = {
        key: base / value
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
        if isinstance(value := getattr(config.kafka, key), Path) and not value.is_absolute()
    }
    sinks = config.sinks
    if sinks.scores_file is not None and not sinks.scores_file.is_absolute():
        sinks = sinks.model_copy(update={"scores_file": base / sinks.scores_file})
    return config.model_copy(
        update={"streams": streams, "kafka": config.kafka.model_copy(update=kafka_files), "sinks": sinks}
    )


def masked_dump(config: Config, secret_paths: set[str]) -> str:
    """The effective config as YAML, with every value that came from the environment masked."""
    data = config.model_dump(mode="json")
    for path in secret_paths:
        _mask(data, path)
    return yaml.safe_dump(data, sort_keys=False)


def _mask(node: Any, path: str) -> None:
    """Replace the value at `path` (as `_interpolate` wrote it) with "***".

    Keys may contain dots (stream names may), so each dict key is matched against the start
    of the remaining path instead of splitting the path on dots.
    """
    if isinstance(node, list):
        match = re.match(r"\[(\d+)\]", path)
        if match is None or int(match.group(1)) >= len(node):
            return
        index, rest = int(match.group(1)), path[match.end() :]
        if rest:
            _mask(node[index], rest.removeprefix("."))
        else:
            node[index] = "***"
        return
    if not isinstance(node, dict):
        return
    for key in list(node):
        name = str(key)
        if path == name:
            node[key] = "***"
        elif path.startswith(name) and path[len(name)] in ".[":
            _mask(node[key], path[len(name) :].removeprefix("."))
