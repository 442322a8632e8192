"""The playground at GET / in a real browser: Debian's headless chromium driven through
chromedriver (selenium), against one real tiny server started with --api-key, so every request
the page makes carries the key it asked for (the event stream included). The streamed video it
plays while it is decoded is read over plain HTTP first, from the same server, whose decode is
paced (WANSERVE_TEST_DECODE_DELAY) so that a job is seen decoding."""
from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import av
import numpy as np
import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import API_KEY, REPO, assert_stopped_after_cancel, png_bytes, wait_ready
from test_http_e2e import decode_frames
from wanserve.api.video import top_level_boxes

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,1000")
ARTIFACTS = REPO / "tests" / ".artifacts"  # git-ignored; docs/img/ holds the committed copies
KEY = API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
JOB_TIMEOUT_S = 150
STREAMED = {"prompt": "a streamed one", "size": "176x96", "num_frames": 33, "fps": 8,
            "num_inference_steps": 1}  # 9 decoded chunks: 1 frame, then 4 each

# every change of the progress bar and the step text, recorded in the page
RECORD_PROGRESS = """
window.seen = {progress: [], steps: []};
const bar = document.getElementById('progress'), step = document.getElementById('step');
new MutationObserver(() => seen.progress.push(Number(bar.getAttribute('aria-valuenow'))))
  .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
new MutationObserver(() => seen.steps.push(step.textContent.trim()))
  .observe(step, {childList: true, characterData: true, subtree: true});
"""

# a frame of the playing <video> on a canvas: its pixels, or the error
FRAME_AT = """
const [time, done] = arguments;
const video = document.getElementById('video');
video.pause();
video.addEventListener('seeked', () => {
  const canvas = document.createElement('canvas');
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  const context = canvas.getContext('2d');
  context.drawImage(video, 0, 0);
  done(Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data));
}, {once: true});
video.currentTime = time;
"""


@pytest.fixture(scope="module")
def server(keyed_server):
    return keyed_server


@pytest.fixture(scope="module")
def browser(server):
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: `make install` installs Debian's "
                    "chromium and chromium-driver")
    profile = tempfile.mkdtemp(prefix="wanserve-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    wait_ready(server)  # the browser started while the model loaded
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def until(driver, condition, timeout: float = 20, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: condition(d), message=what)


def by_id(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def form_enabled(driver) -> bool:
    return not driver.execute_script("return document.getElementById('create-fields').disabled")


def script_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and entry["source"] == "javascript"]


@pytest.fixture
def page(browser, server):
    """The playground with the key already stored (the key prompt has its own test)."""
    browser.get(server.url + "/")
    browser.execute_script("localStorage.setItem('wanserve.apiKey', arguments[0])", KEY)
    browser.refresh()
    until(browser, form_enabled, what="the form never enabled")
    yield browser
    assert script_errors(browser) == []


def fill(driver, tmp_path: Path, **fields) -> None:
    image = tmp_path / "first_frame.png"
    image.write_bytes(png_bytes(176, 96, seed=3))
    by_id(driver, "input_reference").send_keys(str(image))
    for name, value in fields.items():
        element = by_id(driver, name)
        if element.tag_name == "select":
            Select(element).select_by_value(str(value))
        else:
            element.clear()
            element.send_keys(str(value))


def job_row_button(driver, job_id: str, label: str):
    for row in driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr"):
        if row.get_attribute("data-id") == job_id:
            return row.find_element(By.CSS_SELECTOR, f"button.{label}")
    return None


def test_the_page_needs_no_key_and_asks_for_one(browser, server):
    """Checked with: the page's 401 handling not showing the key panel (the askForKey call
    removed); the key required on every path but /health (wanserve/api/app.py)."""
    for path in ("/", "/static/playground.js", "/static/playground.css"):
        resp = requests.get(server.url + path, timeout=10)
        assert resp.status_code == 200 and resp.content, path
    assert requests.get(server.url + "/v1/models", timeout=10).status_code == 401
    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    until(browser, lambda d: by_id(d, "key-panel").is_displayed(), what="no key prompt")
    assert not form_enabled(browser)
    by_id(browser, "api-key").send_keys("wrong")
    by_id(browser, "key-submit").click()
    until(browser, lambda d: "refused" in by_id(d, "key-error").text, what="a wrong key passed")
    by_id(browser, "api-key").clear()
    by_id(browser, "api-key").send_keys(KEY)
    by_id(browser, "key-submit").click()
    until(browser, form_enabled, what="the key did not work")
    assert not by_id(browser, "key-panel").is_displayed()
    # the form comes from /v1/models: the preset's sizes and defaults, a last frame (the A14B
    # miniature takes one), no adapters
    sizes = [o.get_attribute("value") for o in Select(by_id(browser, "size")).options]
    assert sizes == ["", "176x96", "96x176", "128x128", "144x112", "112x144"]
    assert by_id(browser, "num_inference_steps").get_attribute("value") == "4"
    assert by_id(browser, "last_frame-field").is_displayed()
    assert not by_id(browser, "lora-field").is_displayed()
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "playground-idle.png"))
    assert script_errors(browser) == []


def test_a_bad_field_shows_the_servers_message_and_names_the_field(page, tmp_path):
    """Checked with: showError not filling #error-param (the param dropped)."""
    fill(page, tmp_path, prompt="waves", num_inference_steps=999)
    by_id(page, "submit").click()
    until(page, lambda d: by_id(d, "error").is_displayed(), what="no error shown")
    assert by_id(page, "error-param").text == "num_inference_steps"
    assert "between 1 and 50, got 999" in by_id(page, "error-message").text
    assert by_id(page, "num_inference_steps").get_attribute("aria-invalid") == "true"
    assert by_id(page, "job-id").text == "–"  # nothing was queued


def test_a_run_streams_each_step_to_100_and_plays_the_video(page, server, tmp_path):
    """Checked with: the SSE reader dropping step events (showProgress only on terminal
    events) and the video fetched without the key (`<video src>` straight to /content)."""
    fill(page, tmp_path, prompt="a lighthouse in a storm", size="176x96", num_frames=5, fps=8,
         seed=7)
    page.execute_script(RECORD_PROGRESS)
    by_id(page, "submit").click()
    until(page, lambda d: by_id(d, "status").text in ("completed", "failed", "cancelled"),
          JOB_TIMEOUT_S, "the job did not finish")
    assert by_id(page, "status").text == "completed"
    seen = page.execute_script("return window.seen")
    assert seen["progress"][-1] == 100 and seen["progress"] == sorted(seen["progress"]), seen
    assert {f"step {i}/4" for i in range(1, 5)} <= set(seen["steps"]), seen
    job_id = by_id(page, "job-id").text

    until(page, lambda d: d.execute_script("return document.getElementById('video').readyState")
          >= 2, what="the video never loaded")
    width, height, duration, error = page.execute_script(
        "const v = document.getElementById('video');"
        "return [v.videoWidth, v.videoHeight, v.duration, v.error && v.error.message]")
    assert (width, height, error) == (176, 96, None)
    assert duration == pytest.approx(5 / 8, abs=0.02)

    mp4 = requests.get(f"{server.url}/v1/videos/{job_id}/content", timeout=30,
                       headers={"Authorization": f"Bearer {KEY}"}).content
    with av.open(io.BytesIO(mp4)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    page.set_script_timeout(20)
    canvas = np.array(page.execute_async_script(FRAME_AT, 2.5 / 8), np.uint8)
    canvas = canvas.reshape(height, width, 4)[..., :3].astype(int)
    assert canvas.std() > 20, "the frame on the canvas is blank"
    # the browser's YUV -> RGB differs a little from FFmpeg's; another frame differs a lot
    differences = [np.abs(canvas - frame).mean() for frame in decoded]
    assert int(np.argmin(differences)) == 2 and differences[2] < 6, differences

    until(page, lambda d: "seed 7" in by_id(d, "job-facts").text, what="no job facts")
    assert by_id(page, "job-facts").text.startswith("176x96 · 5 frames at 8 fps")
    link = by_id(page, "download")
    assert link.get_attribute("download") == f"{job_id}.mp4"
    size = page.execute_async_script(
        "fetch(arguments[0]).then(r => r.blob()).then(b => arguments[1](b.size))",
        link.get_attribute("href"))
    assert size == len(mp4)
    until(page, lambda d: job_row_button(d, job_id, "play") is not None,
          what="the job is not listed as completed")
    page.execute_script("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.save_screenshot(str(ARTIFACTS / "playground-run.png"))


def test_the_polling_fallback_follows_a_job_from_the_list(browser, server):
    """Checked with: poll() not sending the key (fetch without `api`)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    listed = requests.get(server.url + "/v1/videos", headers=auth, timeout=10).json()["data"]
    done = [job for job in listed if job["status"] == "completed"]
    if not done:  # run alone: one short video first
        done = [requests.post(server.url + "/v1/videos", headers=auth, timeout=JOB_TIMEOUT_S,
                              data={"prompt": "x", "num_frames": 1, "num_inference_steps": 1},
                              files={"input_reference": png_bytes(176, 96)}).json()]
    job_id = done[0]["id"]
    browser.get(server.url + "/?progress=poll")
    browser.execute_script("localStorage.setItem('wanserve.apiKey', arguments[0])", KEY)
    browser.refresh()
    until(browser, lambda d: job_row_button(d, job_id, "play") is not None, what="not listed")
    job_row_button(browser, job_id, "play").click()
    until(browser, lambda d: d.execute_script(
        "return document.getElementById('video').readyState") >= 2, what="the video never loaded")
    assert (by_id(browser, "job-id").text, by_id(browser, "status").text) == (job_id, "completed")
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert f"{server.url}/v1/videos/{job_id}" in fetched
    assert not [url for url in fetched if url.endswith("/events")], fetched
    assert script_errors(browser) == []


def test_a_long_job_cancelled_from_the_list_ends_cancelled(page, server, tmp_path):
    """Checked with: `cancel` in the page sending GET instead of DELETE."""
    fill(page, tmp_path, prompt="a long one", size="176x96", num_frames=5,
         num_inference_steps=50)
    by_id(page, "submit").click()
    until(page, lambda d: by_id(d, "step").text.startswith("step ")
          and not by_id(d, "step").text.startswith("step 0/"), JOB_TIMEOUT_S,
          "the job never started")
    job_id = by_id(page, "job-id").text

    def click_cancel(driver):
        try:
            button = job_row_button(driver, job_id, "cancel")
            return button is not None and (button.click() or True)
        except StaleElementReferenceException:  # the list was redrawn meanwhile
            return False

    until(page, click_cancel, what="no Cancel button for the running job")
    until(page, lambda d: by_id(d, "status").text == "cancelled", 30, "the job did not end")
    assert_stopped_after_cancel(server, job_id, ranks=1, total=50)
    assert not by_id(page, "cancel").is_displayed()
    resp = requests.get(f"{server.url}/v1/videos/{job_id}", timeout=10,
                        headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 404  # DELETE cancels, then deletes


def test_the_job_list_shows_each_completed_jobs_thumbnail(page, server):
    """The list's thumbnail is the job's `variant=thumbnail`, fetched with the key.
    Checked with: `thumbnailCell` fetching with plain `fetch` (no key): the image never loaded."""
    auth = {"Authorization": f"Bearer {KEY}"}
    job = requests.post(server.url + "/v1/videos", headers=auth, timeout=JOB_TIMEOUT_S,
                        data={"prompt": "x", "size": "176x96", "num_frames": 5,
                              "num_inference_steps": 1},
                        files={"input_reference": png_bytes(176, 96)}).json()
    assert job["status"] == "completed", job
    by_id(page, "refresh").click()
    shown = ("const row = document.querySelector(`#jobs tr[data-id='${arguments[0]}']`);"
             "const img = row && row.querySelector('img.thumbnail');"
             "return img && img.complete && img.naturalWidth ? "
             "[img.naturalWidth, img.naturalHeight, img.src.slice(0, 5)] : null")
    until(page, lambda d: d.execute_script(shown, job["id"]), what="no thumbnail in the list")
    assert page.execute_script(shown, job["id"]) == [176, 96, "blob:"]


def test_a_running_streamed_jobs_content_arrives_in_chunks_and_is_the_stored_file(server):
    """`stream: true`: GET /content while the job runs answers 200 chunked, several chunks
    arrive before the job completes, a reader joining late gets the same bytes from the first,
    and the whole decodes to the 33 frames, a fragment per decoded chunk, and is the file
    served after completion. A byte range of the running job is refused; a `stream` that is
    not a boolean is a 400 naming it.
    checked with: `live_video` answering None (wanserve/api/serving.py: the 404 of a running
    job); the stored file encoded again after the decode (`stream = None` before `if stream is
    None and ...` in `_encode_and_complete`)."""
    wait_ready(server)
    refused = requests.post(server.url + "/v1/videos", headers=AUTH, timeout=30,
                            data={**STREAMED, "stream": "sometimes"},
                            files={"input_reference": png_bytes(176, 96)})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
    job = requests.post(server.url + "/v1/videos", headers={**AUTH, "Prefer": "respond-async"},
                        data={**STREAMED, "stream": "true"}, timeout=30,
                        files={"input_reference": png_bytes(176, 96)}).json()
    assert job["stream"] is True
    status = f"{server.url}/v1/videos/{job['id']}"
    content = f"{status}/content"
    chunks, before_completion = [], 0
    with requests.get(content, headers=AUTH, stream=True, timeout=JOB_TIMEOUT_S) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["Transfer-Encoding"] == "chunked"
        for chunk in resp.iter_content(chunk_size=None):
            if not chunks:  # the job is running: a late reader, and a range
                late = requests.get(content, headers=AUTH, stream=True, timeout=JOB_TIMEOUT_S)
                ranged = requests.get(content, headers={**AUTH, "Range": "bytes=100-"},
                                      timeout=10)
            chunks.append(chunk)
            before_completion += requests.get(status, headers=AUTH,
                                              timeout=10).json()["status"] != "completed"
    streamed = b"".join(chunks)
    with late:
        assert late.content == streamed
    assert ranged.status_code == 416 and ranged.json()["error"]["code"] == "range_not_satisfiable"
    assert before_completion >= 3, (before_completion, len(chunks))
    assert requests.get(status, headers=AUTH, timeout=10).json()["status"] == "completed"
    assert requests.get(content, headers=AUTH, timeout=30).content == streamed
    assert top_level_boxes(streamed) == [b"ftyp", b"moov", *[b"moof", b"mdat"] * 9, b"mfra"]
    assert decode_frames(streamed).shape == (33, 96, 176, 3)


def test_a_streamed_sync_call_answers_the_stored_file_and_a_cancel_cuts_it_off(server):
    """POST /v1/videos/sync with `stream: true`: the fragments as they are written, in the
    call, which are the file stored; a job cancelled mid-stream cuts its response off (no
    chunked end, so the client knows it is not whole) instead of ending it or hanging.
    checked with: `send_live` ending a video cut short with `response.eof()` like a whole one
    (wanserve/api/app.py)."""
    wait_ready(server)
    whole = requests.post(server.url + "/v1/videos/sync", headers=AUTH, timeout=JOB_TIMEOUT_S,
                          data={**STREAMED, "num_frames": 5, "stream": "true"},
                          files={"input_reference": png_bytes(176, 96)})
    assert whole.status_code == 200 and whole.headers["Transfer-Encoding"] == "chunked"
    stored = requests.get(f"{server.url}/v1/videos/{whole.headers['X-Request-Id']}/content",
                          headers=AUTH, timeout=30).content
    assert whole.content == stored and decode_frames(stored).shape == (5, 96, 176, 3)
    with requests.post(server.url + "/v1/videos/sync", headers=AUTH, timeout=JOB_TIMEOUT_S,
                       data={**STREAMED, "stream": "true"}, stream=True,
                       files={"input_reference": png_bytes(176, 96)}) as resp:
        chunks = resp.iter_content(chunk_size=None)
        next(chunks)
        requests.delete(f"{server.url}/v1/videos/{resp.headers['X-Request-Id']}", headers=AUTH,
                        timeout=10).raise_for_status()
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in chunks:
                pass


def test_a_streamed_job_plays_in_the_page_before_it_completes(page, server, tmp_path):
    """*Play while it is decoded*: the page reads the job's content as it is written and plays
    it through Media Source Extensions (Debian's chromium has them for H.264) while the server
    still reports the job running; at the end the whole video is there to play and download.
    checked with: movflags without `default_base_moof` (wanserve/api/video.py `FRAGMENTED`):
    chromium's MSE refused the first fragment (a media error), and the video played only from
    the whole file once the job had completed."""
    fill(page, tmp_path, **STREAMED, seed=11)
    by_id(page, "stream").click()
    by_id(page, "submit").click()
    playing = ("const v = document.getElementById('video');"
               "return !v.hidden && v.currentTime > 0 && !v.paused")
    until(page, lambda d: d.execute_script(playing), JOB_TIMEOUT_S, "the video never played")
    job_id = by_id(page, "job-id").text
    job = requests.get(f"{server.url}/v1/videos/{job_id}", headers=AUTH, timeout=10).json()
    assert (job["stream"], job["status"]) == (True, "in_progress")
    assert by_id(page, "playback").get_attribute("data-mode") == "stream"
    assert by_id(page, "playback").text == "Playing while it is decoded."
    until(page, lambda d: by_id(d, "status").text == "completed", JOB_TIMEOUT_S,
          "the job did not complete")
    until(page, lambda d: by_id(d, "download").is_displayed(), what="no download link")
    duration = page.execute_script("return document.getElementById('video').duration")
    assert duration == pytest.approx(33 / 8, abs=0.02)
    mp4 = requests.get(f"{server.url}/v1/videos/{job_id}/content", headers=AUTH,
                       timeout=30).content
    size = page.execute_async_script(
        "fetch(arguments[0]).then(r => r.blob()).then(b => arguments[1](b.size))",
        by_id(page, "download").get_attribute("href"))
    assert size == len(mp4)
