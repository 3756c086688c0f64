"""Three real server processes on one registry folder, as replicas behind a router share one volume.

What docs/scaling.md promises, checked with real processes on this machine: a head registered or
deleted through one replica is listed, served or refused by every other one on the first request
after the writer's answer; writers racing on different replicas (replace, replace, delete, and two
registrations of one new name) each get a clean answer, the folder is at every instant absent or one
whole uploaded version, nothing temporary stays behind, and the replicas agree afterwards; a
generation in flight on one replica while another replaces its head finishes on one version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bench.replicas import head_files, replicas, upload
from heads import CONFIG_NAME, WEIGHTS_NAME, BackwardAttentionConfig, BackwardAttentionHead, read_metadata, save_head
from heads.base import EMBEDDED_BASE, SHIPPED_HEADS
from heads.folders import LOCK_FILE, recover

pytestmark = pytest.mark.slow
TOKEN = "replica-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUNDS = 4
PROMPT = "Tom has 3 apples and buys 4 more. How many apples does Tom have?"


@dataclass
class Cluster:
    urls: list[str]
    heads_dir: Path
    versions: list[dict[str, bytes]]  # tiny heads for the embedded base, each with its own config and weights

    def client(self, i: int) -> httpx.Client:
        return httpx.Client(base_url=self.urls[i], timeout=60.0)


def make_versions(out: Path, count: int) -> list[dict[str, bytes]]:
    """Tiny random heads (no residual, so each one decodes its own text); `task` tells them apart in the config."""
    meta = read_metadata(SHIPPED_HEADS / "math")
    info = {"base_model_name_or_path": meta.base_model_name_or_path, "base_fingerprint": meta.base_fingerprint}
    versions = []
    for k in range(count):
        torch.manual_seed(k)
        head = BackwardAttentionHead(BackwardAttentionConfig(latent_dim=8, num_heads=1, residual=False),
                                     vocab_size=meta.vocab_size, n_embd=meta.n_embd)
        save_head(head, out / f"v{k}", info, task=f"version-{k}", prompt_template=meta.prompt_template)
        versions.append(head_files(out / f"v{k}"))
    return versions


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replicas")
    shutil.copytree(SHIPPED_HEADS / "math", root / "heads" / "math")
    versions = make_versions(root / "versions", 3)
    with replicas(3, EMBEDDED_BASE, root / "heads", root / "logs", token=TOKEN) as servers:
        yield Cluster([s.url for s in servers], root / "heads", versions)


def views(cluster: Cluster) -> list[tuple[Any, Any]]:
    """Each replica's (GET /v1/models, GET /heads); `resident` (what that process has loaded) left out."""
    out = []
    for i in range(len(cluster.urls)):
        with cluster.client(i) as http:
            models = http.get("/v1/models").json()
            heads = [{k: v for k, v in h.items() if k != "resident"} for h in http.get("/heads").json()["heads"]]
        out.append((models, heads))
    return out


def generate(http: httpx.Client, head: str, max_new_tokens: int = 8) -> httpx.Response:
    """Greedy (the default), so two replicas serving one version answer the same text."""
    return http.post("/generate", json={"prompt": PROMPT, "head": head, "max_new_tokens": max_new_tokens,
                                        "ignore_eos": True})


def test_a_registration_on_one_replica_is_listed_and_served_by_the_others_at_once(cluster: Cluster) -> None:
    a, b, c = (cluster.client(i) for i in range(3))
    with a, b, c:
        assert upload(a, "fresh", cluster.versions[0], TOKEN).status_code == 201
        # The folder is in place before A answers: the first request to B or C after that sees it.
        for http in (b, c):
            summary = http.get("/heads/fresh")
            assert summary.status_code == 200 and summary.json()["task"] == "version-0", summary.text
            answer = generate(http, "fresh")
            assert answer.status_code == 200, answer.text
        first = views(cluster)
        assert first[0] == first[1] == first[2]
        assert [m["id"] for m in first[0][0]["data"]] == ["base", "fresh", "math"]

        assert b.delete("/heads/fresh", headers=AUTH).status_code == 204
        for http in (a, b, c):
            assert http.get("/heads/fresh").status_code == 404
            assert generate(http, "fresh").status_code == 404
            assert http.get("/v1/models/fresh").status_code == 404
        after = views(cluster)
        assert after[0] == after[1] == after[2]
        assert [m["id"] for m in after[0][0]["data"]] == ["base", "math"]


def read_whole(folder: Path) -> tuple[bytes, bytes] | None:
    """(config, weights) of the folder at `folder`, both read through one open of it; None if absent."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        return _read_at(fd, CONFIG_NAME), _read_at(fd, WEIGHTS_NAME)
    finally:
        os.close(fd)


def _read_at(folder_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=folder_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def watch(folder: Path, whole: set[tuple[bytes, bytes]], stop: threading.Event, problems: list[str]) -> None:
    """Until `stop`: the folder must be absent or exactly one uploaded version, never a mix or half."""
    while not stop.is_set():
        try:
            seen = read_whole(folder)
        except FileNotFoundError:  # an old version, removed after its swap: look again
            continue
        if seen is not None and seen not in whole:
            problems.append(f"{folder.name}: not one whole uploaded version")


def keep_recovering(root: Path, stop: threading.Event, problems: list[str]) -> None:
    """What a replica starting up runs (`heads.folders.recover`), over and over from another process than the
    writers': it must remove dead leftovers only, never a live writer's folder."""
    while not stop.wait(0.002):  # a breath between rounds, so it does not crowd the writers out of the lock
        try:
            recover(root)
        except OSError as e:
            problems.append(f"recover failed: {e}")


def race(cluster: Cluster, new: str) -> tuple[list[httpx.Response], list[int]]:
    """One round: at one moment A and B replace `hot` with different versions and both register `new`, while C
    deletes `hot` over and over until they are answered, so deletes land before, between and after their swaps."""
    versions = cluster.versions
    barrier, uploaded = threading.Barrier(5), threading.Event()

    def at_once(i: int, call: Callable[[httpx.Client], Any]) -> Any:
        with cluster.client(i) as http:
            barrier.wait()
            return call(http)

    def deletes(http: httpx.Client) -> list[int]:
        codes = []
        while not uploaded.is_set():
            codes.append(http.delete("/heads/hot", headers=AUTH).status_code)
        return codes

    calls: list[tuple[int, Callable[[httpx.Client], Any]]] = [
        (0, lambda h: upload(h, "hot", versions[0], TOKEN, replace=True)),
        (1, lambda h: upload(h, "hot", versions[1], TOKEN, replace=True)),
        (0, lambda h: upload(h, new, versions[0], TOKEN)),
        (1, lambda h: upload(h, new, versions[1], TOKEN)),
        (2, deletes),
    ]
    with ThreadPoolExecutor(len(calls)) as pool:
        running = [pool.submit(at_once, *call) for call in calls]
        answers = [f.result() for f in running[:4]]
        uploaded.set()
        return answers, running[4].result()


def test_writers_racing_on_different_replicas_leave_one_whole_version(cluster: Cluster) -> None:
    versions = cluster.versions
    whole = {(v["config"], v["weights"]) for v in versions}
    hot = cluster.heads_dir / "hot"
    with cluster.client(0) as a:
        assert upload(a, "hot", versions[2], TOKEN).status_code == 201
    dead = cluster.heads_dir / ".hot.upload-0123456789ab"  # what a writer killed mid-upload leaves
    dead.mkdir()
    (dead / CONFIG_NAME).write_bytes(b"{")
    stop, problems = threading.Event(), []
    watchers = [threading.Thread(target=watch, args=(hot, whole, stop, problems)),
                threading.Thread(target=keep_recovering, args=(cluster.heads_dir, stop, problems))]
    for t in watchers:
        t.start()
    try:
        for round_ in range(ROUNDS):
            new = f"new-{round_}"
            answers, deleted = race(cluster, new)
            codes = [r.status_code for r in answers]
            assert codes[:2] == [201, 201], [r.text for r in answers[:2]]
            assert sorted(codes[2:]) == [201, 409], [r.text for r in answers[2:]]  # exactly one registration wins
            assert deleted and set(deleted) <= {204, 404}, deleted
            winner = versions[codes[2:].index(201)]
            assert read_whole(cluster.heads_dir / new) == (winner["config"], winner["weights"])
            assert read_whole(hot) in whole | {None}
    finally:
        stop.set()
        for t in watchers:
            t.join()
    assert problems == []
    hidden = [p.name for p in cluster.heads_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]
    assert hidden == []  # nothing temporary left (the lock file of a shared mount is no leftover)

    # The replicas agree on the listing, on /v1/models, and on what `hot` is, and decode it alike.
    seen = views(cluster)
    assert seen[0] == seen[1] == seen[2]
    texts = []
    for i in range(3):
        with cluster.client(i) as http:
            answer = generate(http, "hot")
            expected = 404 if read_whole(hot) is None else 200
            assert answer.status_code == expected, answer.text
            texts.append(answer.json().get("text"))
    assert texts[0] == texts[1] == texts[2]


def active_sequences(http: httpx.Client) -> float:
    found = re.search(r"^headserve_active_sequences (\S+)$", http.get("/metrics").text, re.MULTILINE)
    assert found, "no headserve_active_sequences gauge"
    return float(found[1])


def test_a_generation_in_flight_while_another_replica_replaces_its_head_keeps_one_version(cluster: Cluster) -> None:
    long = 230  # tokens (the embedded base's context is 256): A's replace lands while B still decodes (checked below)
    a, b, c = (cluster.client(i) for i in range(3))
    in_flight = 0
    with a, b, c:
        for attempt in range(3):  # another try only if B finished before A's replace did (a busy machine)
            old, new = cluster.versions[attempt], cluster.versions[(attempt + 1) % 3]
            assert upload(a, "moving", old, TOKEN, replace=True).status_code == 201
            before = generate(c, "moving", long).json()["text"]  # what the old version decodes, alone
            with b.stream("POST", "/generate", json={"prompt": PROMPT, "head": "moving", "max_new_tokens": long,
                                                     "ignore_eos": True, "stream": True}) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: ")).startswith('data: {"type": "token"')
                assert upload(a, "moving", new, TOKEN, replace=True).status_code == 201
                in_flight += active_sequences(b) > 0
                done = [line for line in lines if line.startswith('data: {"type": "done"')]
            text = json.loads(done[0].removeprefix("data: "))["response"]["text"]
            assert text == before  # the version it started with, whole
            after = generate(c, "moving", long).json()["text"]
            assert after != before  # the versions differ, so the check above can fail
            assert generate(b, "moving", long).json()["text"] == after  # B's next request: the new version
            if in_flight:
                break
    assert in_flight, "B finished decoding before A's replace in every attempt: nothing was in flight"
