"""Evaluation outputs and the side-by-side report: `advpipe report RUN_DIR [RUN_DIR ...] --out DIR`.

One evaluation writes, into its directory (docs/REPORT.md has every key):

    evaluation.json          every number, the settings, fingerprints of model and store, library versions, times
    evaluation.md            the same numbers as Markdown tables
    accuracy_vs_eps.png      white-box FGSM accuracy over eps (AutoAttack marked)
    accuracy_vs_noise.png    Gaussian and uniform noise accuracy, Gaussian flip rate
    variant_accuracy.png     accuracy on clean and every stored variant
    corruptions.png          mean accuracy per corruption

A report puts several evaluations side by side in `report.md`, `report.json` and the same plots.
Every file is built in memory first and then written atomically, evaluation.json / report.json last,
so a failure leaves nothing half-written and the JSON file marks a finished output.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advpipe.errors import DataError
from advpipe.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
EVALUATION_FORMAT = "advpipe-evaluation/1"
EVALUATION_DIR = "evaluation"
PLOTS = ("accuracy_vs_eps.png", "accuracy_vs_noise.png", "variant_accuracy.png", "corruptions.png")
#: the keys of one model in report.json (docs/REPORT.md); a key that does not apply to a model is left out
REPORT_KEYS = ("method", "clean_accuracy", "variant_accuracy", "whitebox_fgsm", "minimal_fgsm", "autoattack",
               "deepfool_median_l2", "gaussian_noise", "noise_flip_rate", "uniform_noise",
               "uniform_noise_renormalised", "corruptions",
               "calibrated", "detector")


# ------------------------------------------------------------------------------------------------ writing


def write_evaluation(out: Path, record: dict[str, Any]) -> None:
    """evaluation.md, the plots, then evaluation.json (each atomic)."""
    models = {record["name"]: record}
    files = {"evaluation.md": markdown(f"Evaluation of {record['name']}", models).encode(), **plots(models)}
    _write(out, files, EVALUATION_FILE, record)


def write_report(paths: Sequence[str | Path], out: str | Path) -> Path:
    """report.md, report.json and the plots for several evaluated runs, side by side."""
    if not paths:
        raise DataError("report: give at least one run directory (or evaluation directory)")
    models = name_records([load_evaluation(Path(p)) for p in paths])
    check_same_data(models)
    out = Path(out)
    files = {"report.md": markdown("Comparison", models).encode(), **plots(models)}
    _write(out, files, "report.json", report_json(models))
    return out


def report_json(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"models": {name: {key: record["results"][key] for key in REPORT_KEYS if key in record["results"]}
                       for name, record in models.items()}}


def _write(out: Path, files: dict[str, bytes], json_name: str, payload: dict[str, Any]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in PLOTS:  # a plot that no longer applies must not survive from an earlier output
            if name not in files and (out / name).exists():
                (out / name).unlink()
        for name, data in files.items():
            atomic_write_bytes(out / name, data)
        atomic_write_json(out / json_name, payload)
    except OSError as exc:
        raise DataError(f"{out}: cannot write here ({exc.strerror or exc}); choose a writable --out") from None


# ------------------------------------------------------------------------------------------------ reading


def load_evaluation(path: Path) -> dict[str, Any]:
    """An evaluation.json, the directory holding it, or a run directory with evaluation/evaluation.json."""
    candidates = [path] if path.suffix == ".json" else [path / EVALUATION_FILE, path / EVALUATION_DIR / EVALUATION_FILE]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise DataError(f"{path}: no {EVALUATION_FILE} there (nor in {path / EVALUATION_DIR}); evaluate it first: "
                        f"`advpipe evaluate {path} --store TEST_STORE`")
    try:
        record = json.loads(found.read_text())
    except ValueError:
        raise DataError(f"{found}: damaged (not JSON); evaluate the run again") from None
    if not isinstance(record, dict) or record.get("format") != EVALUATION_FORMAT or "results" not in record:
        raise DataError(f"{found}: not an advpipe evaluation ({EVALUATION_FORMAT}); write it with `advpipe evaluate`")
    record["_path"] = str(found.resolve())
    return record


def name_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each run by its name; when two share one, their run directories' parents go in front ("a/clean"),
    and failing that (one model evaluated twice) the evaluation directories ("clean @ out/a")."""
    paths = [record["_path"] for record in records]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise DataError(f"report: the same evaluation is given twice: {', '.join(twice)}")
    names = [record["name"] for record in records]
    deepest = max(len(Path(record.get("target") or record["_path"]).parts) for record in records)
    for depth in range(1, deepest + 1):
        if len(set(names)) == len(names):
            break
        names = [_qualified(record, depth) for record in records]
    if len(set(names)) < len(names):
        places = _shortest_unique([Path(path).parent for path in paths])
        names = [f"{record['name']} @ {place}" for record, place in zip(records, places, strict=True)]
    return dict(zip(names, records, strict=True))


def _qualified(record: dict[str, Any], depth: int) -> str:
    """The run name with `depth` parent directories of its run directory (or checkpoint) in front."""
    location = Path(record.get("target") or record["_path"])
    parents = [part for part in location.parent.parts[-depth:] if part not in ("/", "")]
    return "/".join([*parents, record["name"]])


def _shortest_unique(directories: list[Path]) -> list[str]:
    """The shortest trailing parts that tell distinct directories apart."""
    for depth in range(1, max(len(d.parts) for d in directories) + 1):
        labels = ["/".join(d.parts[-depth:]) for d in directories]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in directories]


def check_same_data(models: dict[str, dict[str, Any]]) -> None:
    """Side by side only makes sense on the same test images of the same classes."""
    def key(record: dict[str, Any]) -> tuple:
        store = record["store"]
        return store["test_fingerprint"], tuple(store["class_names"]), tuple(store["image_shape"])

    keys = {name: key(record) for name, record in models.items()}
    if len(set(keys.values())) > 1:
        lines = [f"  {name}: {_dataset(models[name])}" for name in keys]
        raise DataError("report: these runs were evaluated on different test data, so their numbers cannot be "
                        "compared:\n" + "\n".join(lines) + "\nevaluate them on the same test store "
                        "(`advpipe evaluate RUN_DIR --store TEST_STORE`) and report again")
    settings = {json.dumps(record["config"], sort_keys=True) for record in models.values()}
    if len(settings) > 1:
        log.warning("report: the runs were evaluated with different evaluation settings; report.md lists them")


def _dataset(record: dict[str, Any]) -> str:
    store = record["store"]
    kind = (store.get("source") or {}).get("kind", "unknown data")
    shape = "x".join(str(v) for v in store["image_shape"])
    return (f"{kind}, {len(store['class_names'])} classes, {shape} images, test images "
            f"{store['test_fingerprint'][:12]} (store {store['path']})")


# ----------------------------------------------------------------------------------------------- Markdown


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mean(values: dict[str, float | None] | None) -> float | None:
    found = [v for v in (values or {}).values() if v is not None]
    return sum(found) / len(found) if found else None


def _levels(models: dict[str, dict[str, Any]], key: str) -> list[str]:
    """The union of the levels (eps, sigma, a) the models were measured at, in numeric order."""
    found = {level for record in models.values() for level in (record["results"].get(key) or {})}
    return sorted(found, key=float)


def _variant_order(models: dict[str, dict[str, Any]]) -> list[str]:
    """Stored variants in the stores' own order (the JSON files keep keys sorted)."""
    names: dict[str, None] = {}  # ordered and unique
    for record in models.values():
        measured = record["results"].get("variant_accuracy", {})
        names.update((v, None) for v in [*record["store"].get("variants", []), *sorted(measured)] if v in measured)
    return list(names)


def _corruption_order(models: dict[str, dict[str, Any]]) -> list[str]:
    """Corruptions in the configured order."""
    names: dict[str, None] = {}  # ordered and unique
    for record in models.values():
        measured = record["results"].get("corruptions") or {}
        names.update((c, None) for c in [*record["config"].get("corruptions", []), *sorted(measured)] if c in measured)
    return list(names)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def corruption_means(corruptions: dict[str, dict[str, float]] | None) -> tuple[dict[str, float], float | None]:
    """Mean accuracy per corruption over its severities, and the mean over corruptions."""
    means = {name: sum(levels.values()) / len(levels) for name, levels in (corruptions or {}).items() if levels}
    return means, (sum(means.values()) / len(means) if means else None)


def headline(models: dict[str, dict[str, Any]]) -> str:
    """One row per model: the numbers a user compares first (the main job prints this table)."""
    fgsm_eps = _headline_eps(models)
    renormalised = any(r["results"].get("uniform_noise_renormalised") for r in models.values())
    header = ["model", "method", "clean", "AutoAttack", f"FGSM eps={fgsm_eps}" if fgsm_eps else "FGSM",
              "min-FGSM success", "blank gradients", "DeepFool median L2", "Gaussian noise (mean)",
              "uniform noise, clipped (mean)", *(["uniform noise, renormalised (mean)"] if renormalised else []),
              "corruptions (mean)"]
    rows = []
    for name, record in models.items():
        r = record["results"]
        minimal, attack = r.get("minimal_fgsm") or {}, r.get("autoattack")
        rows.append([name, r.get("method", "-"), pct(r.get("clean_accuracy")),
                     f"{pct(attack['accuracy'])} @ {attack['eps']:.4g}" if attack else "-",
                     pct((r.get("whitebox_fgsm") or {}).get(fgsm_eps)) if fgsm_eps else "-",
                     pct(minimal.get("success_rate")), pct(minimal.get("blank_gradient_rate")),
                     num(r.get("deepfool_median_l2")), pct(_mean(r.get("gaussian_noise"))),
                     pct(_mean(r.get("uniform_noise"))),
                     *([pct(_mean(r.get("uniform_noise_renormalised")))] if renormalised else []),
                     pct(corruption_means(r.get("corruptions"))[1])])
    return _table(header, rows)


def _headline_eps(models: dict[str, dict[str, Any]]) -> str | None:
    """The swept FGSM eps closest to the AutoAttack eps (the middle of the sweep without AutoAttack)."""
    levels = _levels(models, "whitebox_fgsm")
    if not levels:
        return None
    targets = [r["results"]["autoattack"]["eps"] for r in models.values() if r["results"].get("autoattack")]
    if not targets:
        return levels[len(levels) // 2]
    return min(levels, key=lambda level: abs(float(level) - targets[0]))


def markdown(title: str, models: dict[str, dict[str, Any]]) -> str:
    sections = [f"# {title}", _provenance(models), "## Summary", headline(models)]
    for builder in (_variants_section, _fgsm_section, _minimal_section, _autoattack_section, _noise_section,
                    _corruption_section, _detector_section, _calibrated_section):
        text = builder(models)
        if text:
            sections.append(text)
    sections.append("## Plots\n\n" + "\n".join(f"![{p[:-4]}]({p})" for p in PLOTS))
    return "\n\n".join(sections) + "\n"


def _provenance(models: dict[str, dict[str, Any]]) -> str:
    first = next(iter(models.values()))
    lines = [f"Test data: {_dataset(first)}.", ""]
    for name, record in models.items():
        details, times = record["results"], record.get("wall_time_s", {})
        fingerprint = record["model"]["fingerprints"]["model"][:12]
        lines.append(f"- **{name}** ({details.get('method', '-')}): {record['model']['arch']} model "
                     f"{record['model']['path']} (weights {fingerprint}), {record['details']['images']} of "
                     f"{record['details']['test_images']} test images for the white-box and noise measures, "
                     f"on {record.get('device', '-')} in {times.get('total', 0.0):.1f} s")
    settings = {json.dumps(record["config"], sort_keys=True) for record in models.values()}
    if len(settings) > 1:
        lines.append("\n**Warning:** the models were evaluated with different settings (see each evaluation.json).")
    return "\n".join(lines)


def _variants_section(models: dict[str, dict[str, Any]]) -> str:
    variants = _variant_order(models)
    if not variants:
        return ""
    rows = [[name, pct(r["results"].get("clean_accuracy")),
             *(pct(r["results"].get("variant_accuracy", {}).get(v)) for v in variants)] for name, r in models.items()]
    return ("## Accuracy on the stored variants\n\nTransfer from the source model the variants were made "
            "against (the detector paper's Table 4 layout).\n\n" + _table(["model", "clean", *variants], rows))


def _sweep_section(models: dict[str, dict[str, Any]], key: str, symbol: str) -> str:
    levels = _levels(models, key)
    if not levels:
        return ""
    rows = [[name, *(pct((r["results"].get(key) or {}).get(level)) for level in levels)]
            for name, r in models.items()]
    return _table(["model", *(f"{symbol}={level}" for level in levels)], rows)


def _fgsm_section(models: dict[str, dict[str, Any]]) -> str:
    table = _sweep_section(models, "whitebox_fgsm", "eps")
    return f"## White-box FGSM (L-inf, pixels in [0, 1])\n\n{table}" if table else ""


def _minimal_section(models: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, record in models.items():
        minimal = record["results"].get("minimal_fgsm")
        if minimal is None:
            continue
        extra = record["details"].get("minimal_fgsm", {})
        rows.append([name, str(extra.get("images", "-")), pct(minimal["success_rate"]), num(minimal["mean_linf"]),
                     pct(minimal["blank_gradient_rate"]),
                     str(extra.get("failures_with_blank_gradient", "-"))])
    if not rows:
        return ""
    return ("## Minimal FGSM (BANG)\n\nOn the correctly classified images: the smallest FGSM step on the eps grid "
            "that fools the model, and the images whose input gradient is all zeros (no gradient attack can move "
            "them: a failure there is gradient masking, not robustness).\n\n"
            + _table(["model", "images", "success", "mean L-inf", "blank gradients", "failures with blank gradient"],
                     rows))


def _autoattack_section(models: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, record in models.items():
        attack = record["results"].get("autoattack")
        deepfool = record["details"].get("deepfool", {})
        if attack is None and record["results"].get("deepfool_median_l2") is None and not deepfool:
            continue
        rows.append([name, pct(attack["accuracy"]) if attack else "-", f"{attack['eps']:.4g}" if attack else "-",
                     attack["setting"] if attack else "-", num(record["results"].get("deepfool_median_l2")),
                     pct(deepfool.get("success_rate"))])
    if not rows:
        return ""
    return ("## AutoAttack and DeepFool\n\nAutoAttack through ART (docs/REPORT.md): a setting marked *reduced* is "
            "cheaper than the standard one and overestimates robustness; *non-standard* runs other components or "
            "losses than AutoAttack's (DeepFool for FAB-T, ART's DLR for APGD-T's targeted DLR), so its number is "
            "not comparable with published AutoAttack results.\n\n"
            + _table(["model", "AutoAttack accuracy", "eps", "setting", "DeepFool median L2", "DeepFool success"],
                     rows))


def _noise_section(models: dict[str, dict[str, Any]]) -> str:
    parts = []
    for key, title in (("gaussian_noise", "Gaussian noise: accuracy"),
                       ("noise_flip_rate", "Gaussian noise: flip rate (BANG; correctly classified images whose "
                                           "noisy copy is classified differently)"),
                       ("uniform_noise_renormalised", "Uniform noise x + U(0, a), each image renormalised into "
                                                      "[0, 1] (min-max; the weight-map paper's form): accuracy"),
                       ("uniform_noise", "Uniform noise clip(x + U(0, a), 0, 1): accuracy")):
        table = _sweep_section(models, key, "a" if key.startswith("uniform_noise") else "sigma")
        if table:
            parts.append(f"### {title}\n\n{table}")
    return "## Noise\n\n" + "\n\n".join(parts) if parts else ""


def _corruption_section(models: dict[str, dict[str, Any]]) -> str:
    names = _corruption_order(models)
    if not names:
        return ""
    rows = []
    for name, record in models.items():
        means, overall = corruption_means(record["results"].get("corruptions"))
        rows.append([name, *(pct(means.get(c)) for c in names), pct(overall)])
    return ("## Common corruptions (CIFAR-10-C parameters, mean over severities)\n\n"
            + _table(["model", *names, "mean"], rows))


def _detector_section(models: dict[str, dict[str, Any]]) -> str:
    rows = [[name, pct(r["results"]["detector"]["clean_accuracy"]),
             pct(r["results"]["detector"]["adversarial_accuracy"])]
            for name, r in models.items() if r["results"].get("detector")]
    if not rows:
        return ""
    return ("## Detector head\n\nHow often the detector tells clean test images as clean and stored attacks as "
            "adversarial (on the reference model's feature maps).\n\n"
            + _table(["model", "clean", "adversarial"], rows))


def _calibrated_section(models: dict[str, dict[str, Any]]) -> str:
    rows = [[name, variant, pct(pair["alone"]), pct(pair["with_calibrater"])]
            for name, r in models.items() for variant, pair in (r["results"].get("calibrated") or {}).items()]
    if not rows:
        return ""
    return ("## Calibrater\n\nThe frozen model alone and behind its calibrater.\n\n"
            + _table(["model", "variant", "model alone", "with calibrater"], rows))


# -------------------------------------------------------------------------------------------------- plots


def plots(models: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes of every plot some model has data for."""
    out = {}
    for name, draw in zip(PLOTS, (_plot_eps, _plot_noise, _plot_variants, _plot_corruptions), strict=True):
        figure = draw(models)
        if figure is not None:
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            out[name] = buffer.getvalue()
    return out


def _figure(columns: int = 1, width: float = 6.0) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, 4.0))
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, columns, i + 1) for i in range(columns)]
    return figure, axes


def _plot_eps(models: dict[str, dict[str, Any]]) -> Any:
    if not any(r["results"].get("whitebox_fgsm") for r in models.values()):
        return None
    figure, (axis,) = _figure()
    for index, (name, record) in enumerate(models.items()):
        r, color = record["results"], f"C{index % 10}"
        sweep = sorted((float(k), v) for k, v in (r.get("whitebox_fgsm") or {}).items())
        xs = [0.0, *(k for k, _ in sweep)]
        ys = [r.get("clean_accuracy"), *(v for _, v in sweep)]
        axis.plot(xs, [100 * y for y in ys], marker="o", color=color, label=name)
        if r.get("autoattack"):
            axis.plot([r["autoattack"]["eps"]], [100 * r["autoattack"]["accuracy"]], marker="*", markersize=13,
                      linestyle="none", color=color)
    if any(r["results"].get("autoattack") for r in models.values()):
        axis.plot([], [], marker="*", markersize=13, linestyle="none", color="0.3", label="AutoAttack")
    axis.set(xlabel="eps (L-inf, pixels in [0, 1])", ylabel="accuracy (%)",
             title="White-box FGSM (lines), AutoAttack (stars)", ylim=(0, 100))
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def _plot_noise(models: dict[str, dict[str, Any]]) -> Any:
    panels = [(key, label, title) for key, label, title in (
        ("gaussian_noise", "sigma", "Gaussian noise: accuracy"),
        ("noise_flip_rate", "sigma", "Gaussian noise: flip rate"),
        ("uniform_noise_renormalised", "a", "Uniform noise U(0, a), renormalised: accuracy"),
        ("uniform_noise", "a", "Uniform noise U(0, a), clipped: accuracy"))
        if any(r["results"].get(key) for r in models.values())]
    if not panels:
        return None
    figure, axes = _figure(len(panels), 4.5)
    for axis, (key, label, title) in zip(axes, panels, strict=True):
        for index, (name, record) in enumerate(models.items()):
            sweep = sorted((float(k), v) for k, v in (record["results"].get(key) or {}).items() if v is not None)
            if sweep:
                axis.plot([k for k, _ in sweep], [100 * v for _, v in sweep], marker="o", color=f"C{index % 10}",
                          label=name)
        axis.set(xlabel=label, ylabel="%", title=title, ylim=(0, 100))
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def _bars(axis: Any, groups: list[str], values: dict[str, list[float | None]]) -> None:
    width = 0.8 / max(1, len(values))
    for index, (name, ys) in enumerate(values.items()):
        xs = [g + (index - (len(values) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(xs, [0.0 if y is None else 100 * y for y in ys], width, label=name, color=f"C{index % 10}")
    axis.set_xticks(range(len(groups)))
    axis.set_xticklabels(groups, rotation=30, ha="right")
    axis.set(ylabel="accuracy (%)", ylim=(0, 100))
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _plot_variants(models: dict[str, dict[str, Any]]) -> Any:
    groups = ["clean", *_variant_order(models)]
    if len(groups) == 1:
        return None
    figure, (axis,) = _figure(width=max(6.0, 0.6 * len(groups) * max(1, len(models)) ** 0.5))
    values = {name: [r["results"].get("clean_accuracy") if g == "clean" else
                     r["results"].get("variant_accuracy", {}).get(g) for g in groups] for name, r in models.items()}
    _bars(axis, groups, values)
    axis.set_title("Accuracy on the stored variants")
    return figure


def _plot_corruptions(models: dict[str, dict[str, Any]]) -> Any:
    means = {name: corruption_means(r["results"].get("corruptions")) for name, r in models.items()}
    groups = _corruption_order(models)
    if not groups:
        return None
    figure, (axis,) = _figure(width=max(6.0, 0.7 * (len(groups) + 1)))
    _bars(axis, [*groups, "mean"], {name: [*(m[0].get(g) for g in groups), m[1]] for name, m in means.items()})
    axis.set_title("Common corruptions (mean over severities)")
    return figure
