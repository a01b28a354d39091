"""Plots of a recorded run: raw and prepared features (the original pipeline's visualisation).

Reads a CSV as ``windfarm-sim record`` writes it (or any CSV with ``qx, qy,
qz, qw, wind_speed_rps, rps, voltage``, optional ``ts``, ``turbine`` and
``faults`` columns), converts each sample to the six features exactly as the
device does (``edgeapp.features``), and draws for one turbine:

- ``<turbine>-raw.png``: the six raw features against time, with the periods
  when a fault was injected shaded and named;
- ``<turbine>-prepared.png``: the same features wavelet-denoised over the
  whole run and normalised with the model's preprocessing constants (the
  seed statistics unless a package's ``manifest.json`` is given), as the
  model sees them;
- ``<turbine>-histograms.png``: each prepared feature's distribution.

matplotlib (the ``plot`` extra) draws off-screen (Agg); each PNG is written
to a temporary name and renamed when complete.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from edgeapp.features import FEATURES, RAW_FIELDS, PreprocessingParams, denoise, raw_to_features

__all__ = ["PlotError", "Recording", "read_recording", "plot_recording", "save_figure"]

_UNITS = ("rad", "rad", "rad", "anemometer rps", "rotor rps", "mV")
_TURBINE_COLUMNS = ("turbine", "turbine_id", "turbineId")


class PlotError(ValueError):
    """A recording that cannot be plotted (the message says why)."""


@dataclass(frozen=True)
class Recording:
    turbine: str
    t: NDArray[np.float64]  # seconds from the first sample
    raw: NDArray[np.float64]  # (n, 7) in RAW_FIELDS order
    faults: list[str]  # per sample, "" when normal


def read_recording(path: Path, turbine: str | None = None) -> tuple[Recording, list[str]]:
    """One turbine's samples (the first one unless named) and every turbine id in the file."""
    try:
        fh = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise PlotError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in RAW_FIELDS if c not in header]
        if missing:
            raise PlotError(f"{path}: missing columns {', '.join(missing)}")
        id_column = next((c for c in _TURBINE_COLUMNS if c in header), None)
        ids: list[str] = []
        seen: set[str] = set()
        ts: list[float] = []
        rows: list[list[float]] = []
        faults: list[str] = []
        for line, row in enumerate(reader, start=2):
            tid = row[id_column] if id_column else "recording"
            if tid not in seen:
                seen.add(tid)
                ids.append(tid)
            if tid != (turbine or ids[0]):
                continue
            try:
                rows.append([float(row[c]) for c in RAW_FIELDS])
                ts.append(float(row["ts"]) / 1000.0 if row.get("ts") else len(ts) / 20.0)
            except (TypeError, ValueError):
                raise PlotError(f"{path}:{line}: not a number") from None
            faults.append(row.get("faults") or "")
    chosen = turbine or (ids[0] if ids else None)
    if chosen is None or not rows:
        known = ", ".join(ids[:10]) or "none"
        raise PlotError(f"{path}: no samples of turbine {chosen!r} (turbines: {known})")
    t = np.asarray(ts)
    return Recording(chosen, t - t[0], np.asarray(rows), faults), ids


def _fault_spans(t: NDArray[np.float64], faults: Sequence[str]) -> list[tuple[float, float, str]]:
    spans = []
    start = 0
    for i in range(1, len(faults) + 1):
        if i == len(faults) or faults[i] != faults[start]:
            if faults[start]:
                spans.append((float(t[start]), float(t[i - 1]), faults[start]))
            start = i
    return spans


def save_figure(fig: object, path: Path, dpi: int = 110) -> Path:
    """Lay ``fig`` out, write it as a PNG atomically (no half-written file), close it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - loaded already by whoever drew ``fig``

    fig.tight_layout()  # type: ignore[attr-defined]  # a matplotlib Figure
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=dpi, format="png")  # type: ignore[attr-defined]  # a matplotlib Figure
    tmp.replace(path)
    plt.close(fig)  # type: ignore[arg-type]  # a matplotlib Figure
    return path


def plot_recording(
    csv_path: Path, out_dir: Path, *, turbine: str | None = None, manifest: Path | None = None
) -> list[Path]:
    """Write the three PNGs of one turbine of ``csv_path`` into ``out_dir``; their paths."""
    try:
        import matplotlib  # noqa: PLC0415 - an optional extra, loaded only to plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'windedge[plot]'") from None
    params = PreprocessingParams.default()
    if manifest is not None:
        try:
            block = json.loads(manifest.read_text(encoding="utf-8"))["preprocessing"]
        except (OSError, ValueError, KeyError) as exc:
            raise PlotError(f"{manifest}: no preprocessing block ({exc})") from None
        params = PreprocessingParams.from_block(block)
    rec, _ids = read_recording(csv_path, turbine)
    if len(rec.t) < 64:
        raise PlotError(f"{csv_path}: {len(rec.t)} samples of {rec.turbine}: too few to prepare")
    feats = raw_to_features(rec.raw)
    prepared = (denoise(feats, params) - params.mean_array) / params.std_array
    spans = _fault_spans(rec.t, rec.faults)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def series(values: NDArray[np.float64], title: str, name: str, normalised: bool) -> None:
        fig, axes = plt.subplots(len(FEATURES), 1, figsize=(12, 13), sharex=True)
        for k, ax in enumerate(axes):
            ax.plot(rec.t, values[:, k], linewidth=0.6)
            ax.set_ylabel(f"{FEATURES[k]}\n({'std units' if normalised else _UNITS[k]})")
            ax.grid(alpha=0.3)
            for start, end, label in spans:
                ax.axvspan(start, end, color="tab:red", alpha=0.12)
                if k == 0:
                    ax.text(start, 1.02, label, transform=ax.get_xaxis_transform(), fontsize=8)
        axes[-1].set_xlabel("seconds")
        fig.suptitle(f"{title}: turbine {rec.turbine}")
        written.append(save_figure(fig, out_dir / f"{rec.turbine}-{name}.png"))

    series(feats, "raw features", "raw", normalised=False)
    series(prepared, "prepared features (denoised, normalised)", "prepared", normalised=True)
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for k, ax in enumerate(axes.flat):
        ax.hist(prepared[:, k], bins=60, color="tab:blue", alpha=0.8)
        ax.set_title(FEATURES[k])
    fig.suptitle(f"prepared feature distributions: turbine {rec.turbine}")
    written.append(save_figure(fig, out_dir / f"{rec.turbine}-histograms.png"))
    return written
