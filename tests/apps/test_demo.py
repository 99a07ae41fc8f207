"""apps.demo served for real and driven in headless Chromium (Debian's ``chromium`` through playwright-python's
``executable_path``; no browser download), then through ``gradio_client``.  What the page shows is checked against
:func:`apps.compare.compare_scales` and :func:`apps.compare.filter_detections` run here on the same model and
image (detection counts do not depend on timing)."""

from __future__ import annotations

import os
import re
import shutil
import socket

import pytest

from apps import demo
from apps.compare import compare_scales, filter_detections
from toolkit.data.voc import read_image_bgr

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _require_browser():
    missing = []
    if CHROMIUM is None:
        missing.append("Debian's chromium (make test installs it as root: apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright-python (the test extra)")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_dsod_checkpoints, tmp_path_factory):
    """The demo serving the ThumbDet student and a file that fails to load, on a free local port."""
    bad = tmp_path_factory.mktemp("bad") / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    args = demo.get_args_parser().parse_args(["--checkpoint", str(tiny_dsod_checkpoints["student"]),
                                              "--checkpoint", str(bad), "--rounds", "2"])
    registry = demo.make_registry(args)
    app = demo.build_app(registry, rounds=2)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", registry
    app.close()


def _counts(registry, mini_shapes_image, threshold):
    loaded = next(iter(registry.models.values()))
    comparison = compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=1)
    return {r.label: len(filter_detections(r, threshold, loaded.classes)["scores"]) for r in comparison.runs}


def _captions(page, gallery_id):
    text = page.inner_text(f"#{gallery_id}")
    return dict((label, int(n)) for label, n in re.findall(r"([a-z]+(?: 1/\d)?): (\d+) detections", text))


def test_the_page_runs_compares_redraws_and_reports_errors(served, mini_shapes_image, tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    url, registry = served
    expected = _counts(registry, mini_shapes_image, 0.3)
    assert list(expected) == ["full", "bicubic 1/2", "bicubic 1/4", "learned 1/2"]
    with sync_playwright() as p:
        # Chromium's fake camera (a test pattern) stands in for a webcam.
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--use-fake-ui-for-media-stream",
                                          "--use-fake-device-for-media-stream"])
        page = browser.new_context(permissions=["camera"], viewport={"width": 1400, "height": 1800}).new_page()
        page.goto(url)
        page.wait_for_selector("#run")
        # The file that failed to load is named in the page, with the loader's message.
        assert "broken.pth" in page.inner_text("#status") and "not a readable PyTorch checkpoint" in \
            page.inner_text("#status")

        page.set_input_files("#image_file input[type=file]", str(mini_shapes_image))
        page.click("#run")
        page.wait_for_function("document.querySelector('#table') && "
                               "document.querySelector('#table').innerText.includes('learned 1/2')", timeout=60000)
        page.wait_for_selector("#detections img")
        page.wait_for_selector("#chart img, #chart svg, #chart canvas")
        assert _captions(page, "detections") == expected
        table = page.inner_text("#table")
        for label, n in expected.items():
            # scale, input, PyTorch ms and range, onnxruntime ms and range, their ratio, GFLOPs, detections
            assert re.search(rf"{re.escape(label)}\s+\S+ x \S+\s+[\d.]+\s+[\d.]+-[\d.]+\s+[\d.]+\s+[\d.]+-[\d.]+"
                             rf"\s+[\d.]+\s+[\d.]+\s+{n}\b", table), (label, n, table)
        thumbs = page.inner_text("#thumbnails")
        assert "bicubic 1/2 thumbnail, 78x78" in thumbs and "learned 1/2 thumbnail, 78x78" in thumbs
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        drawings = page.eval_on_selector_all("#detections img", "els => els.map(e => e.src)")

        # The slider redraws without running the model again: the counts follow the new threshold.
        lower = _counts(registry, mini_shapes_image, 0.1)
        assert lower != expected
        latencies = re.findall(r"\s(\d+\.\d+-\d+\.\d+)\s", page.inner_text("#table"))
        page.locator("#threshold input[type=range]").fill("0.1")
        captions = [f"{label}: {n} detections" for label, n in lower.items()]
        page.wait_for_function(
            "(want) => want.every(c => document.querySelector('#detections').innerText.includes(c))",
            arg=captions, timeout=30000)
        assert _captions(page, "detections") == lower
        assert page.input_value("#threshold input[type=number]") == "0.1"
        assert re.findall(r"\s(\d+\.\d+-\d+\.\d+)\s", page.inner_text("#table")) == latencies  # not rerun
        # The drawings of the scales whose count changed, and only those, were redrawn.
        redrawn = page.eval_on_selector_all("#detections img", "els => els.map(e => e.src)")
        assert [a != b for a, b in zip(drawings, redrawn)] == [expected[k] != lower[k] for k in expected]

        # A file that is not an image: the error, in the page.
        text_file = tmp_path / "notes.txt"
        text_file.write_text("not an image")
        page.click("#image_file button[aria-label='Clear']")
        page.set_input_files("#image_file input[type=file]", str(text_file))
        page.click("#run")
        page.wait_for_function("document.querySelector('#status').innerText.includes('not a decodable image')",
                               timeout=30000)
        assert "Traceback" not in page.inner_text("body")
        assert page.inner_text("#table").count("learned 1/2") == 0  # the failed run cleared the results

        # A webcam snapshot instead of a file.
        page.click("#image_file button[aria-label='Clear']")
        page.click("#webcam button:has-text('Click to Access Webcam')")
        page.wait_for_function("(() => { const v = document.querySelector('#webcam video'); "
                               "return v && v.readyState >= 2 && v.videoWidth > 0; })()", timeout=30000)
        page.click("#webcam button[aria-label='capture photo']")
        page.wait_for_selector("#webcam img")
        page.click("#run")
        page.wait_for_function("document.querySelector('#table').innerText.includes('learned 1/2')", timeout=60000)
        assert page.inner_text("#status").strip() == ""
        assert set(_captions(page, "detections")) == set(expected)
        browser.close()


def test_the_same_through_gradio_client(served, mini_shapes_image):
    from gradio_client import Client, handle_file

    url, registry = served
    name = next(iter(registry.models))
    client = Client(url, verbose=False)
    classes = list(registry.models[name].classes[1:])
    image = handle_file(str(mini_shapes_image))
    *_, summary, status = client.predict(name, image, None, 0.1, classes, api_name="/compare")
    assert status == ""
    got = {s["scale"]: len(s["detections"]) for s in summary["scales"]}
    assert got == _counts(registry, mini_shapes_image, 0.1)
    assert all(s["latency_ms"] > 0 and s["gflops"] > 0 for s in summary["scales"])
    assert all(s["onnxruntime_latency_ms"] > 0 and len(s["onnxruntime_times_ms"]) == 2
               and s["pytorch_over_onnxruntime"] == pytest.approx(s["latency_ms"] / s["onnxruntime_latency_ms"])
               for s in summary["scales"])
    # The class filter through the API: one class only.
    *_, summary, _ = client.predict(name, image, None, 0.1, classes[:1], api_name="/compare")
    assert all(d["class"] == classes[0] for s in summary["scales"] for d in s["detections"])


def test_without_a_model_the_page_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/main/checkpoint.pth here
    registry = demo.make_registry(demo.get_args_parser().parse_args([]))
    assert not registry.models and not registry.errors
    app = demo.build_app(registry)
    status = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "status")
    assert "make run" in status.value and "--out runs/main" in status.value


def test_the_main_thread_runner_runs_calls_there_and_hands_errors_back():
    import threading

    runner = demo.MainThreadRunner()
    stop = threading.Event()
    seen = {}

    def worker():
        seen["thread"] = runner.call(lambda: threading.current_thread() is threading.main_thread())
        seen["sum"] = runner.call(lambda a, b: a + b, 2, 3)
        try:
            runner.call(lambda: 1 / 0)
        except ZeroDivisionError as exc:
            seen["error"] = exc
        stop.set()

    thread = threading.Thread(target=worker)
    thread.start()
    runner.serve(stop, poll_s=0.01)  # this test runs on the main thread
    thread.join()
    assert seen["thread"] is True and seen["sum"] == 5 and isinstance(seen["error"], ZeroDivisionError)
    assert runner.call(lambda: 7) == 7  # on the main thread itself: directly


# ------------------------------------------------------------------------------------------- ONNX files
def _export(checkpoint, out):
    from toolkit.export import main as export_main

    assert export_main(["--checkpoint", str(checkpoint), "-o", str(out), "--with-postprocess"]) == 0
    return out


def test_onnx_files_from_the_command_line(tiny_dsod_checkpoints, tmp_path):
    path = _export(tiny_dsod_checkpoints["teacher"], tmp_path / "teacher.onnx")
    missing = tmp_path / "missing.onnx"
    args = demo.get_args_parser().parse_args(["--onnx", str(path), "--onnx", str(missing), "--no-onnxruntime"])
    assert args.onnx == [str(path), str(missing)] and args.onnxruntime is False
    assert demo.get_args_parser().parse_args([]).onnxruntime is True
    registry = demo.make_registry(args)
    (name, loaded), = registry.models.items()
    assert name == f"dsod_tiny: {path}" and loaded.is_onnx and loaded.imported is not None
    assert registry.errors == [f"onnx {missing}: {missing}: no such file"]


def test_the_table_and_summary_say_n_a_for_a_side_that_did_not_run(tiny_dsod_checkpoints, mini_shapes_image):
    import json

    from apps.compare import LoadedModel
    from toolkit.engine import load_trained_model

    model, classes, name = load_trained_model(tiny_dsod_checkpoints["teacher"])
    loaded = LoadedModel(model, name, tuple(classes), "teacher")
    comparison = compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=2, onnxruntime=False)
    _, _, rows, figure, summary = demo.render(comparison, loaded, 0.3, None)
    assert len(rows[0]) == len(demo.TABLE_HEADERS)
    for row in rows:
        assert isinstance(row[2], float) and re.fullmatch(r"[\d.]+-[\d.]+", row[3])
        assert row[4:7] == ["n/a", "n/a", "n/a"] and isinstance(row[7], float)
    scales = json.loads(json.dumps(summary, allow_nan=False))["scales"]  # JSON without NaN
    assert all(s["onnxruntime_latency_ms"] is None and s["onnxruntime_times_ms"] == [] for s in scales)
    assert all(s["onnxruntime_error"] == "not run (PyTorch only)" for s in scales)
    bars = [p for p in figure.axes[0].patches]
    assert len(bars) == len(rows)  # PyTorch's bars only


def test_an_uploaded_onnx_file_runs_through_gradio_client(served, tiny_dsod_checkpoints, mini_shapes_image, tmp_path):
    from gradio_client import Client, handle_file

    url, registry = served
    path = _export(tiny_dsod_checkpoints["teacher"], tmp_path / "uploaded.onnx")
    client = Client(url, verbose=False)
    choice, status = client.predict(handle_file(str(path)), api_name="/load_model")
    assert status.startswith("loaded dsod_tiny: ") and status.endswith("uploaded.onnx")
    name = status[len("loaded "):]
    assert registry.models[name].is_onnx
    outputs = client.predict(name, handle_file(str(mini_shapes_image)), None, 0.1,
                             list(registry.models[name].classes[1:]), api_name="/compare")
    table, summary, status = outputs[-4], outputs[-2], outputs[-1]
    assert status == ""
    assert table["headers"] == demo.TABLE_HEADERS and [row[0] for row in table["data"]] == ["full"]
    scale, = summary["scales"]
    assert scale["detections_from"] == "onnxruntime" and scale["onnxruntime_latency_ms"] > 0
    assert scale["latency_ms"] > 0 and scale["gflops"] > 0  # onnx2torch's module, the PyTorch side
    loaded = registry.models[name]
    expected = compare_scales(loaded, read_image_bgr(mini_shapes_image), rounds=1).runs[0]
    assert len(scale["detections"]) == len(filter_detections(expected, 0.1, loaded.classes)["scores"]) > 0
