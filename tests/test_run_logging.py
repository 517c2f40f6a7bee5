"""What the loggers get at the end of a run: the result as metrics and parameters, report.md and the plots as files
(TensorBoard: text and images; CSV: copies), and every probe of a real run tagged by concept and layer."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from test_progress import tensorboard_events, tensorboard_scalars

from slug_lightning import config_path, console
from slug_lightning.cli import main
from slug_lightning.run_logging import FILE_WRITERS, log_run, run_files

REPORT = {
    "method": "slug",
    "verdict": "forgotten",
    "concepts": [
        {
            "name": "Vesna Fairbank",
            "layer": "visual.proj",
            "verdict": "forgotten",
            "step_size": 6.25,
            "relative_change": 0.2125,
            "forget_top1_before": 1.0,
            "forget_top1_after": 0.0,
            "forget_top5_before": 1.0,
            "forget_top5_after": 1.0,
        },
        {"name": "AC/DC", "layer": None, "verdict": "nothing to forget", "forget_top1_before": 0.0},
    ],
    "before": {"test": {"objects": {"top1": 0.979, "top5": 1.0, "count": 48}}},
    "after": {"test": {"objects": {"top1": 0.975, "top5": 1.0, "count": 48}}},
}


def _run_dir(tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "report.md").write_text("# SLUG run\n\n**forgotten**\n", encoding="utf-8")
    for name, color in (("search_vesna_fairbank", (255, 0, 0)), ("similarity_identities", (0, 0, 255))):
        Image.new("RGB", (12, 8), color).save(output / f"{name}.png")
    return output


def test_tensorboard_and_csv_get_the_result_and_the_files(tmp_path):
    output = _run_dir(tmp_path)
    tensorboard, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    log_run([tensorboard, csv_logger], REPORT, output)

    scalars = tensorboard_scalars(tmp_path / "tb")
    assert scalars["result/Vesna_Fairbank/step_size"] == {0: 6.25}
    assert scalars["result/test/objects/top1_after"] == {0: pytest.approx(0.975)}
    assert scalars["result/AC_DC/forget_top1_before"] == {0: 0.0}  # a slash would open a new level, a space is "_"
    texts, images = {}, {}
    for event in tensorboard_events(tmp_path / "tb"):
        for value in event.summary.value:
            if value.HasField("image"):
                images[value.tag] = (value.image.width, value.image.height)
            elif value.metadata.plugin_data.plugin_name == "text":
                texts[value.tag.split("/text_summary")[0]] = value.tensor.string_val[0].decode()
    assert texts == {"run/report": "# SLUG run\n\n**forgotten**\n"}
    assert images == {"plots/search_vesna_fairbank": (12, 8), "plots/similarity_identities": (12, 8)}

    folder = tmp_path / "csv" / "version_0"
    assert (folder / "report.md").read_text(encoding="utf-8") == "# SLUG run\n\n**forgotten**\n"
    for name in ("search_vesna_fairbank.png", "similarity_identities.png"):
        assert np.array_equal(np.asarray(Image.open(folder / name)), np.asarray(Image.open(output / name)))
    with open(folder / "metrics.csv", newline="") as file:
        (row,) = list(csv.DictReader(file))
    assert float(row["result/Vesna_Fairbank/forget_top1_after"]) == 0.0 and row["step"] == "0"
    hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
    assert hparams["result/Vesna_Fairbank/layer"] == "visual.proj" and hparams["result/verdict"] == "forgotten"
    assert "result/AC_DC/layer" not in hparams


class Recorder:
    """Stands in for a W&B run or an MLflow client: records each call as (name, args, kwargs)."""

    def __init__(self) -> None:
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_wandb_and_mlflow_get_the_files_through_their_loggers(tmp_path):
    output = _run_dir(tmp_path)
    files = [str(output / name) for name in ("report.md", "search_vesna_fairbank.png", "similarity_identities.png")]
    writers = dict(FILE_WRITERS)
    wandb = SimpleNamespace(experiment=Recorder(), images=[])
    wandb.log_image = lambda key, images, **kwargs: wandb.images.append((key, images, kwargs))
    writers[WandbLogger](wandb, run_files(output))
    assert wandb.experiment.calls == [("log_artifact", (files[0],), {"name": "slug-report", "type": "slug-run"})]
    captions = ["search_vesna_fairbank", "similarity_identities"]
    assert wandb.images == [("plots", files[1:], {"caption": captions})]
    mlflow = SimpleNamespace(experiment=Recorder(), run_id="r1")
    writers[MLFlowLogger](mlflow, run_files(output))
    assert mlflow.experiment.calls == [("log_artifact", ("r1", f), {"artifact_path": "slug"}) for f in files]


def test_nothing_is_logged_without_a_report(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    log_run([logger], None, _run_dir(tmp_path))
    assert not (tmp_path / "csv").exists()


# --- a real run: what the console shows and what the loggers keep --------------------------------------------------

NOISE = ("\r", "Tip", "LitLogger", "predict returned None", "DeprecationWarning", "FutureWarning", "deprecated")


def _small_run(small_demo, output, *extra):
    # A tight budget: two batches per gradient stream, three probes per layer, no similarity matrix.
    return [
        "unlearn",
        "--config",
        str(config_path("demo/unlearn.yaml")),
        "--config",
        str(small_demo / "demo_paths.yaml"),
        "--trainer.limit_predict_batches=2",
        "--search.init_args.max_steps=3",
        "--search.init_args.similarity_classes=0",
        "--output_dir",
        str(output),
        *extra,
    ]


def test_a_run_in_a_log_and_its_loggers(small_demo, tmp_path, capfd):
    loggers = [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "tb")}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}},
    ]
    command = [sys.executable, "-m", "slug_lightning", *_small_run(small_demo, tmp_path / "run")]
    command.append(f"--trainer.logger={json.dumps(loggers)}")
    # stdout and stderr are pipes, as in a log file or a CI job
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    concept = report["concepts"][0]["name"]
    tag = concept.replace(" ", "_")
    for word in NOISE:
        assert word not in result.stdout + result.stderr, word
    layer_lines = [line for line in result.stderr.splitlines() if line.startswith(f"search {concept} · layer ")]
    searched = sorted({(p["layer"]) for p in report["search"]})
    assert len(layer_lines) == len(searched) and all(" probe" in line for line in layer_lines)
    assert "SLUG result" in result.stdout

    # every logger: each probe, by concept and layer, at steps that count that layer's probes; the result; the files
    scalars = tensorboard_scalars(tmp_path / "tb")
    with open(next((tmp_path / "csv").rglob("metrics.csv")), newline="") as file:
        rows = list(csv.DictReader(file))
    for layer in searched:
        probes = [p for p in report["search"] if p["layer"] == layer]
        forget = f"search/{tag}/{layer}/forget_top1"
        assert scalars[forget] == {step: pytest.approx(p["forget_top1"]) for step, p in enumerate(probes)}
        assert [int(r["step"]) for r in rows if r.get(forget)] == list(range(len(probes)))
    assert scalars[f"result/{tag}/step_size"] == {0: pytest.approx(report["concepts"][0]["step_size"])}
    texts = {v.tag for e in tensorboard_events(tmp_path / "tb") for v in e.summary.value if v.HasField("tensor")}
    texts = {text.split("/text_summary")[0] for text in texts}
    images = {v.tag for e in tensorboard_events(tmp_path / "tb") for v in e.summary.value if v.HasField("image")}
    assert "run/report" in texts and images == {f"plots/{name[:-4]}" for name in report["plots"]}
    kept = {path.name for path in next((tmp_path / "csv").rglob("metrics.csv")).parent.iterdir()}
    assert {"report.md", *report["plots"]} <= kept

    # --quiet: the result alone
    capfd.readouterr()
    try:
        assert main(["--quiet", *_small_run(small_demo, tmp_path / "quiet")]) == 0
    finally:
        console.configure_output("normal")  # as a later command line in this process would
    out, err = capfd.readouterr()
    assert out.strip().startswith("=" * 20) and out.strip().endswith("=" * 20) and "SLUG result" in out
    assert err == ""
