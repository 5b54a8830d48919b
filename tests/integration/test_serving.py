"""Serving what a run logged: the classifier over a real `mlflow models serve`, the predict CLI,
and promotion with rollback in the registry (SQLite and through a tracking server)."""

from __future__ import annotations

import base64
import contextlib
import csv
import http.server
import io
import json
import re
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from dlharness import checkpoint_path
from dlharness.data.base import image_transform
from dlharness.data.digits import DigitsDataModule, digit_images
from dlharness.models.nets import build_net
from dlharness.serving import predict, promote, serve
from dlharness.store.server import free_port, running_server, stop_server, wait_until_healthy
from dlharness.tracking.checkpointing.logged_models import checkpoint_models
from dlharness.training.train import train
from tests.conftest import PYTHON, bench_module, cli_env, empty_store, make_store, tiny_config

pytestmark = pytest.mark.slow

NAME = "digits-served"
DIGITS = [str(d) for d in range(10)]
# Seconds `mlflow models serve` may take to answer /health (≈5 s measured on 2 cores).
SERVE_START_S = 90


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny digits run whose classifier is registered, promoted to champion by the CLI."""
    uri = make_store(tmp_path_factory.mktemp("serving"))
    result = train(tiny_config(uri, **{"tracking.register_model": NAME}))
    assert promote.main([NAME, "--tracking-uri", uri]) == 0
    return uri, result


@pytest.fixture(scope="module")
def images():
    """30 raw digit images, uint8 8×8."""
    raw, _ = digit_images()
    return raw[:30, 0].numpy()


def expected_probabilities(result, raw: np.ndarray) -> np.ndarray:
    x = image_transform(*DigitsDataModule().normalization, None)(torch.from_numpy(raw)[:, None])
    with torch.no_grad():
        return result.module.net.cpu().eval()(x).softmax(dim=1).numpy()


@contextlib.contextmanager
def serving(model_uri: str, uri: str, folder: Path):
    """`dlharness-serve MODEL_URI` on a free loopback port: its URL."""
    port = free_port()
    log = folder / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(Path(PYTHON).parent / "dlharness-serve"), model_uri,
             "--port", str(port), "--tracking-uri", uri],
            env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(url, process, SERVE_START_S)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"dlharness-serve: {exc}: {log.read_text()[-2000:]}")
        yield url
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """`dlharness-serve models:/NAME@champion`: its URL."""
    uri, _ = trained
    with serving(f"models:/{NAME}@champion", uri, tmp_path_factory.mktemp("serve")) as url:
        yield url


def test_an_earlier_epochs_checkpoint_is_registered_and_served_like_that_epochs_network(
    trained, images, tmp_path
):
    uri, result = trained
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    first = checkpoint_models(client, run.info.experiment_id, result.run_id)[0].model_id
    argv = ["digits-epoch-0", "--checkpoint", f"models:/{first}", "--tracking-uri", uri]
    assert promote.main(argv) == 0
    assert client.get_run(result.run_id).info.status == "FINISHED"  # reopened, not changed
    version = client.get_model_version_by_alias("digits-epoch-0", "candidate")
    assert version.run_id == result.run_id
    path = checkpoint_path(f"models:/{first}", tracking_uri=uri, dst=tmp_path / "checkpoint")
    state = torch.load(path, weights_only=True)
    net = build_net(state["hyper_parameters"]["net_spec"])
    net.load_state_dict({k[4:]: v for k, v in state["state_dict"].items() if k.startswith("net.")})
    x = image_transform(*DigitsDataModule().normalization, None)(torch.from_numpy(images)[:, None])
    with torch.no_grad():
        expected = net.eval()(x).softmax(dim=1).numpy()
    assert not np.allclose(expected, expected_probabilities(result, images), atol=1e-3)
    with serving("models:/digits-epoch-0@candidate", uri, tmp_path) as url:
        answers = invocations(url, images.tolist()).json()["predictions"]
    np.testing.assert_allclose(probabilities(answers), expected, atol=1e-5)


def invocations(url: str, inputs) -> requests.Response:
    return requests.post(f"{url}/invocations", json={"inputs": inputs}, timeout=60)


def probabilities(answers) -> np.ndarray:
    return np.array([[a["probabilities"][d] for d in DIGITS] for a in answers])


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_served_model_answers_raw_pixels_like_the_network(server, trained, images):
    _, result = trained
    response = invocations(server, images.tolist())
    assert response.status_code == 200
    answers = response.json()["predictions"]
    expected = expected_probabilities(result, images)
    np.testing.assert_allclose(probabilities(answers), expected, atol=1e-5)
    assert [a["class_index"] for a in answers] == expected.argmax(axis=1).tolist()
    assert [a["class_name"] for a in answers] == [DIGITS[i] for i in expected.argmax(axis=1)]
    assert [a["confidence"] for a in answers] == pytest.approx(expected.max(axis=1), abs=1e-5)


def test_base64_png_and_rgb_pixels_get_the_same_answers(server, images):
    by_pixels = probabilities(invocations(server, images[:5].tolist()).json()["predictions"])
    by_png = invocations(server, [png_base64(image) for image in images[:5]])
    assert by_png.status_code == 200
    np.testing.assert_allclose(probabilities(by_png.json()["predictions"]), by_pixels, atol=1e-7)
    # Grey as RGB (R = G = B) converts back to the same grey values.
    rgb = np.repeat(images[:5, :, :, None], 3, axis=3)
    by_rgb = invocations(server, rgb.tolist())
    np.testing.assert_allclose(probabilities(by_rgb.json()["predictions"]), by_pixels, atol=1e-7)


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        ([], "empty batch: send at least one image"),
        ([[1, 2, 3]], "image 0: pixel array of shape 3; expected H×W"),
        ([[[1, 2], [3, 4]], [[1, 2], [3]]], "image 1: rows of unequal length"),
        ([[[0, 300], [0, 0]]], "image 0: pixel values must be integers 0–255"),
        (["aGVsbG8="], "image 0: not a base64-encoded PNG or JPEG file"),
        ([{"a": 1}], "image 0: a dict; send a pixel array or a base64 PNG/JPEG string"),
    ],
    ids=["empty", "wrong-shape", "ragged", "out-of-range", "not-an-image", "not-an-array"],
)
def test_bad_requests_get_a_400_with_one_reason_and_the_server_keeps_serving(
    server, images, inputs, reason
):
    response = invocations(server, inputs)
    assert response.status_code == 400
    assert predict.server_reason(response).startswith(reason)
    assert invocations(server, images[:1].tolist()).status_code == 200


def write_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i, pixels in enumerate(images):
        paths.append(folder / f"digit_{i:02d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def read_csv(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    files = [row["file"] for row in rows]
    return files, np.array([[float(r[f"p_{d}"]) for d in DIGITS] for r in rows]), rows


def test_predict_over_a_folder_here_and_through_the_server(server, trained, images, tmp_path):
    uri, result = trained
    paths = write_pngs(tmp_path / "pngs", images[:12])
    expected = expected_probabilities(result, images[:12])
    here, there = tmp_path / "here.csv", tmp_path / "there.csv"
    model = f"models:/{NAME}@champion"
    pngs = str(tmp_path / "pngs")
    assert predict.main([model, pngs, "--tracking-uri", uri, "--out", str(here)]) == 0
    assert predict.main([model, pngs, "--server", server, "--out", str(there)]) == 0
    for csv_path in (here, there):
        files, got, rows = read_csv(csv_path)
        assert files == [str(p) for p in paths]
        # The CSV keeps 6 significant digits.
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert [r["class"] for r in rows] == [DIGITS[i] for i in expected.argmax(axis=1)]


def test_predict_refuses_bad_input_in_one_line(server, trained, images, tmp_path, capsys):
    uri, _ = trained
    write_pngs(tmp_path / "pngs", images[:2])
    (tmp_path / "pngs" / "notes.png").write_text("not a picture")
    model = f"models:/{NAME}@champion"
    cases = [
        ([model, str(tmp_path / "pngs"), "--server", server], "notes.png: not an image file"),
        ([model, str(tmp_path / "missing")], "missing: no such file or folder"),
        ([f"models:/{NAME}@nope", str(tmp_path / "pngs" / "digit_00.png"), "--tracking-uri", uri],
         "alias nope not found"),
    ]  # fmt: skip
    for argv, message in cases:
        assert predict.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1


def test_predict_reports_a_failing_server_in_one_line(trained, images, tmp_path, capsys):
    """A server that answers 500 (a real HTTP server on loopback) is an error, exit 1."""

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.dumps({"error_code": "INTERNAL_ERROR", "message": "Error: out of memory"})
            self.send_response(500)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    write_pngs(tmp_path / "pngs", images[:1])
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing) as failing:
        threading.Thread(target=failing.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{failing.server_address[1]}"
        code = predict.main([f"models:/{NAME}@champion", str(tmp_path / "pngs"), "--server", url])
        failing.shutdown()
    err = capsys.readouterr().err
    assert code == 1
    assert err == "dlharness-predict: error: the server failed (HTTP 500): out of memory\n"


def test_serve_refuses_a_model_the_store_does_not_have(trained, capsys):
    uri, _ = trained
    assert serve.main(["models:/no-such-model/1", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlharness-serve: error: model models:/no-such-model/1:")
    assert err.count("\n") == 1


def test_classifier_loads_and_predicts_without_dlharness(trained, images):
    """The model carries its code: a process that cannot import dlharness serves it."""
    uri, result = trained
    script = f"""
import importlib.abc, json, sys
class NoDlharness(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dlharness":
            raise ImportError("dlharness is not installed here")
sys.meta_path.insert(0, NoDlharness())
import mlflow
mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model({result.classifier_uri!r})
answers = model.predict(json.loads(sys.stdin.read()))
print(json.dumps([a.probabilities for a in answers]))
print(sorted(m for m in sys.modules if m.startswith("dlharness")))
"""
    done = subprocess.run(
        [PYTHON, "-c", script], input=json.dumps(images[:4].tolist()), env=cli_env(),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answers, modules = done.stdout.strip().splitlines()[-2:]
    assert modules == "[]"
    got = np.array([[a[d] for d in DIGITS] for a in json.loads(answers)])
    np.testing.assert_allclose(got, expected_probabilities(result, images[:4]), atol=1e-5)


def test_serving_benchmark_measures_the_server_and_in_process(server, trained, tmp_path):
    uri, _ = trained
    bench = bench_module("serving_latency")
    report = bench.measure(
        f"models:/{NAME}@champion", server, tracking_uri=uri, single_requests=20,
        batch_requests=2, batch_size=256, max_seconds=60,
    )  # fmt: skip
    for where in ("server", "in_process"):
        figures = report[where]
        assert 0 < figures["single_p50_ms"] <= figures["single_p99_ms"]
        assert figures["batch_images_per_s"] > 0
    assert report["requests_failed"] == 0


# Promotion


def register_version(client: MlflowClient, acc: float) -> str:
    """A version of digits-lifecycle from a run that logged test/acc = `acc`; candidate → it.

    Promotion reads only the registry and the runs' metrics, so the runs carry no model.
    """
    experiment = client.get_experiment_by_name("lifecycle") or client.get_experiment(
        client.create_experiment("lifecycle")
    )
    run = client.create_run(experiment.experiment_id)
    client.log_metric(run.info.run_id, "test/acc", acc)
    client.set_terminated(run.info.run_id)
    name = "digits-lifecycle"
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/classifier"
    version = client.create_model_version(name, source, run_id=run.info.run_id).version
    client.set_registered_model_alias(name, "candidate", version)
    return str(version)


@pytest.fixture(params=["sqlite", "server"])
def registry_uri(request, tmp_path):
    if request.param == "sqlite":
        yield empty_store(tmp_path)
        return
    with running_server(empty_store(tmp_path / "server"), tmp_path / "server" / "artifacts") as (
        url,
        _,
    ):
        yield url


def test_promote_refuses_a_worse_version_and_rolls_back(registry_uri, capsys):
    client = MlflowClient(registry_uri)
    name = "digits-lifecycle"

    def cli(*args: str) -> tuple[int, str]:
        capsys.readouterr()  # what registering the versions printed
        code = promote.main([name, *args, "--tracking-uri", registry_uri])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    def aliases() -> dict[str, str]:
        return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}

    register_version(client, 0.80)
    assert cli() == (0, f"{name}@champion → version 1: first champion, test/acc 0.8\n")
    register_version(client, 0.90)
    code, out = cli("--reason", "weekly retrain")
    assert (code, out) == (
        0, f"{name}@champion → version 2 (was version 1): test/acc 0.9 vs 0.8 of version 1; weekly retrain\n"
    )  # fmt: skip
    tags = client.get_model_version(name, "2").tags
    assert tags["deployment.alias"] == "champion"
    assert tags["deployment.from"] == "candidate"
    assert tags["deployment.reason"] == "test/acc 0.9 vs 0.8 of version 1; weekly retrain"
    assert "@" in tags["deployment.by"] and tags["deployment.at"].endswith("+00:00")
    assert aliases() == {"candidate": "2", "champion": "2", "previous": "1"}

    register_version(client, 0.70)
    code, out = cli()
    assert code == 1
    assert out == (
        f"dlharness-promote: refused: {name} version 3 (candidate) is worse than champion "
        "version 2: test/acc 0.7 vs 0.9 of version 2; not promoted (--force overrides)\n"
    )
    assert aliases()["champion"] == "2"
    # A lower-is-better metric turns the comparison round; a metric no run logged is refused.
    assert cli("--metric", "test/loss")[0] == 2
    assert cli("--goal", "min")[0] == 0
    assert aliases() == {"candidate": "3", "champion": "3", "previous": "2"}
    assert "forced" not in client.get_model_version(name, "3").tags["deployment.reason"]

    assert cli("--rollback")[0] == 0
    assert aliases() == {"candidate": "3", "champion": "2", "previous": "3"}
    assert "deployment.rolled_back_at" in client.get_model_version(name, "3").tags
    assert client.get_model_version(name, "2").tags["deployment.reason"] == (
        "rollback from version 3"
    )
    code, out = cli("--from", "previous", "--force")
    assert code == 0
    assert "forced, worse: test/acc 0.7 vs 0.9 of version 2" in out
    code, out = cli("--list")
    assert code == 0
    for version, acc in (("1", "0.8000"), ("2", "0.9000"), ("3", "0.7000")):
        assert re.search(rf"│ {version} +│[^│]*│ {acc} ", out), out
    assert cli("--rollback", "--to", "staging") == (
        2, f"dlharness-promote: error: {name} has no alias 'staging-previous' "
        "(aliases: candidate → v3, champion → v3, previous → v2)\n",
    )  # fmt: skip


def test_promote_names_a_missing_model_or_store(tmp_path, capsys):
    assert promote.main(["nope", "--tracking-uri", empty_store(tmp_path)]) == 2
    assert capsys.readouterr().err == "dlharness-promote: error: no registered model named 'nope'\n"
    assert promote.main(["nope", "--tracking-uri", f"sqlite:///{tmp_path}/absent.db"]) == 2
    assert "no tracking store at" in capsys.readouterr().err
