"""The soak's mixed traffic: workers that pick one action at a time, and a poller that follows
every accepted asynchronous job to its end. Every answer is counted by action and status."""
from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import requests

TERMINAL = ("completed", "failed", "cancelled")
SIZES = ("64x64", "96x64", "64x96", "128x128")
LARGEST = {"size": "128x128", "num_frames": "9", "num_inference_steps": "3"}
BURST = 8


class Traffic:
    def __init__(self, server, rng: random.Random, image: bytes, last_image: bytes,
                 bad: list, send_raw, last_frame: bool, presets: list[str], replicas: int,
                 adapters: list[str] = ()):
        self.server, self.rng, self.image, self.last_image = server, rng, image, last_image
        self.adapters = list(adapters)  # `lora` values: one adapter, a scale, several
        self.bad, self.send_raw = bad, send_raw
        self.last_frame, self.presets, self.replicas = last_frame, presets, replicas
        self.port = urlsplit(server.url).port
        self.lock = threading.Lock()
        self.jobs: dict[str, dict] = {}  # every accepted job: its last known state
        self.statuses: Counter = Counter()  # "action status" -> count
        self.server_errors: list[str] = []
        self.bad_not_4xx: list[str] = []
        self._stop = threading.Event()
        self.actions = [(self.create_sync, 20), (self.create_async, 25), (self.cancel, 4),
                        (self.delete_finished, 4), (self.list_page, 10), (self.download_range, 10),
                        (self.thumbnail, 3), (self.events_dropped, 5), (self.bad_one, 12),
                        (self.bad_burst, 2), (self.streamed, 6)]

    # --- bookkeeping -----------------------------------------------------------------------
    def count(self, action: str, status: int | str) -> None:
        with self.lock:
            self.statuses[f"{action} {status}"] += 1
            if isinstance(status, int) and status >= 500:
                self.server_errors.append(f"{action} {status}")

    def _accept(self, body: dict) -> None:
        with self.lock:
            self.jobs[body["id"]] = {"status": body["status"], "error": body.get("error")}

    def _pick(self, wanted) -> str | None:
        with self.lock:
            ids = [job for job, state in self.jobs.items() if wanted(state["status"])]
        return self.rng.choice(ids) if ids else None

    def outcomes(self, evicted: set[str]) -> dict[str, str]:
        """Each accepted job's end: its terminal status, `deleted`, `evicted`, or (lost) what
        was last seen."""
        return {job: "evicted" if state["status"] == "gone" and job in evicted else
                ("lost: " + state["status"] if state["status"] == "gone" else state["status"])
                for job, state in self.jobs.items()}

    # --- actions ---------------------------------------------------------------------------
    def params(self) -> dict:
        rng = self.rng
        fields = {"prompt": rng.choice(["a lighthouse", "waves at night", "a red kite"]),
                  "size": rng.choice(SIZES), "num_frames": rng.choice(["5", "9"]),
                  "num_inference_steps": rng.choice(["1", "2", "3"]),
                  "seed": str(rng.randrange(2**31))}
        if rng.random() < 0.3:  # guidance off: one branch
            fields.update(guidance_scale="1.0", guidance_scale_2="1.0")
        if rng.random() < 0.3:
            fields["cache"] = rng.choice(self.presets)
        if self.adapters and rng.random() < 0.3:
            fields["lora"] = rng.choice(self.adapters)
        return fields

    def files(self, with_last: bool) -> dict:
        files = {"input_reference": ("r.png", self.image, "image/png")}
        if with_last and self.last_frame:
            files["last_frame"] = ("l.png", self.last_image, "image/png")
        return files

    def _create(self, action: str, fields: dict, prefer_async: bool,
                last: bool | None = None) -> None:
        with_last = self.rng.random() < 0.2 if last is None else last
        resp = requests.post(self.server.url + "/v1/videos", data=fields,
                             files=self.files(with_last),
                             headers={"Prefer": "respond-async"} if prefer_async else {},
                             timeout=600)
        self.count(action, resp.status_code)
        if resp.status_code in (200, 202):
            self._accept(resp.json())

    def create_sync(self) -> None:
        self._create("create_sync", self.params(), prefer_async=False)

    def create_async(self) -> None:
        self._create("create_async", self.params(), prefer_async=True)

    def cancel(self) -> None:
        job = self._pick(lambda status: status not in TERMINAL + ("gone", "deleted"))
        if job:
            self._delete("cancel", job)

    def delete_finished(self) -> None:
        job = self._pick(lambda status: status in TERMINAL)
        if job:
            self._delete("delete_finished", job)

    def _delete(self, action: str, job: str) -> None:
        resp = requests.delete(f"{self.server.url}/v1/videos/{job}", timeout=30)
        self.count(action, resp.status_code)
        if resp.status_code == 200:
            with self.lock:
                self.jobs[job]["status"] = "deleted"

    def list_page(self) -> None:
        query = {"limit": self.rng.randint(1, 20), "order": self.rng.choice(["asc", "desc"])}
        page = requests.get(self.server.url + "/v1/videos", params=query, timeout=30)
        self.count("list", page.status_code)
        if page.status_code == 200 and page.json()["has_more"]:
            query["after"] = page.json()["last_id"]
            self.count("list", requests.get(self.server.url + "/v1/videos", params=query,
                                            timeout=30).status_code)

    def download_range(self) -> None:
        job = self._pick(lambda status: status == "completed")
        if job:
            span = self.rng.choice(["bytes=0-99", "bytes=-100", "bytes=100-", "bytes=0-"])
            resp = requests.get(f"{self.server.url}/v1/videos/{job}/content",
                                headers={"Range": span}, timeout=30)
            self.count("download", resp.status_code)

    def thumbnail(self) -> None:
        job = self._pick(lambda status: status == "completed")
        if job:
            resp = requests.get(f"{self.server.url}/v1/videos/{job}/content",
                                params={"variant": "thumbnail"}, timeout=30)
            self.count("thumbnail", resp.status_code)

    def events_dropped(self) -> None:
        """Subscribes to a job's events and goes away after the first one."""
        job = self._pick(lambda status: status != "gone" and status != "deleted")
        if not job:
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", f"/v1/videos/{job}/events")
            resp = conn.getresponse()
            self.count("events", resp.status)
            if resp.status == 200:
                resp.readline()
        finally:
            conn.close()

    def streamed(self) -> None:
        """A `stream: true` job's content read while it decodes: to the end, or dropped after
        the first chunk."""
        resp = requests.post(self.server.url + "/v1/videos", data={**self.params(), "stream": "true"},
                             files=self.files(False), headers={"Prefer": "respond-async"},
                             timeout=600)
        self.count("stream_create", resp.status_code)
        if resp.status_code != 202:
            return
        self._accept(resp.json())
        whole = self.rng.random() < 0.5
        with requests.get(f"{self.server.url}/v1/videos/{resp.json()['id']}/content",
                          stream=True, timeout=600) as content:
            self.count("stream_content", content.status_code)
            if content.status_code == 200:
                try:
                    for _ in content.iter_content(chunk_size=None):
                        if not whole:
                            break
                except requests.RequestException:  # cut off: the job was cancelled meanwhile
                    self.count("stream_content", "cut")

    def bad_one(self, case=None) -> None:
        what, method, target, headers, body = case or self.rng.choice(self.bad)
        status, _, _ = self.send_raw(self.server, method, target, headers, body)
        self.count("bad", status)
        if not 400 <= status < 500:
            with self.lock:
                self.bad_not_4xx.append(f"{what}: {status}")

    def bad_burst(self) -> None:
        with ThreadPoolExecutor(BURST) as pool:
            list(pool.map(self.bad_one, self.rng.sample(self.bad, BURST)))

    # --- running ---------------------------------------------------------------------------
    def prime(self) -> None:
        """Before the idle figures are taken (not counted): the largest request, with a last
        frame, in each of its variants at once (guidance on and off, the step cache on and
        off, the adapters), so that memory reaches the high-water mark traffic will; one
        of each action; a burst of concurrent creates, so that every pool has grown to its
        size."""
        variants = [{**LARGEST, "prompt": "prime", **guidance, **cache}
                    for guidance in ({}, {"guidance_scale": "1.0", "guidance_scale_2": "1.0"})
                    for cache in ({}, {"cache": self.presets[0]})]
        if self.adapters:  # every adapter at once: the most LoRA layers a request runs
            variants.append({**LARGEST, "prompt": "prime", "lora": max(self.adapters, key=len)})
        with ThreadPoolExecutor(BURST) as pool:
            list(pool.map(lambda fields: self._create("prime", fields, True, True), variants))
            self.drain(timeout=600)
            for action, _ in self.actions:
                action()
            list(pool.map(lambda _: self.create_async(), range(BURST)))
        self.drain(timeout=600)
        with self.lock:
            self.statuses.clear()
            self.server_errors.clear()

    def _worker(self, deadline: float) -> None:
        actions, weights = zip(*self.actions)
        while time.monotonic() < deadline and not self._stop.is_set():
            action = self.rng.choices(actions, weights)[0]
            try:
                action()
            except requests.RequestException as exc:
                self.count(action.__name__, type(exc).__name__)
            time.sleep(self.rng.uniform(0, 0.2))

    def _poll_once(self) -> int:
        """Reads every job not yet ended; returns how many are still live."""
        with self.lock:
            live = [job for job, state in self.jobs.items()
                    if state["status"] not in TERMINAL + ("deleted", "gone")]
        for job in live:
            resp = requests.get(f"{self.server.url}/v1/videos/{job}", timeout=30)
            with self.lock:
                if resp.status_code == 404 and self.jobs[job]["status"] != "deleted":
                    self.jobs[job]["status"] = "gone"
                elif resp.status_code == 200 and self.jobs[job]["status"] != "deleted":
                    body = resp.json()
                    self.jobs[job] = {"status": body["status"], "error": body.get("error")}
        return len(live)

    def run(self, clients: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        workers = [threading.Thread(target=self._worker, args=(deadline,)) for _ in range(clients)]
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers):
            self._poll_once()
            time.sleep(0.3)
        for worker in workers:
            worker.join()

    def drain(self, timeout: float) -> None:
        """Until every accepted job has ended (or the timeout)."""
        deadline = time.monotonic() + timeout
        while self._poll_once() and time.monotonic() < deadline:
            time.sleep(0.3)
