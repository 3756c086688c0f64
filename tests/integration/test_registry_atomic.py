# ruff: noqa: F811  (test arguments are named after the imported fixtures they receive)
"""The registry never shows a half state: concurrent replaces of one name each succeed while readers of
it never see it missing, writers and deletes are serialised, and start-up clears what crashes left."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from heads import CONFIG_NAME, WEIGHTS_NAME, load_head
from heads.base import Base
from tests.integration.test_server_heads import (  # noqa: F401  (the app fixtures of the heads API tests)
    base,
    client,
    head_files,
    heads_dir,
    make_client,
    upload,
    write_head,
)

WRITERS = 10


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def run_all(jobs: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()


def test_a_replace_storm_answers_every_writer_201_and_every_reader_200(client: TestClient, base: Base,
                                                                       heads_dir: Path, tmp_path: Path) -> None:
    write_head(base, heads_dir / "hot")
    uploads = [head_files(base, tmp_path, seed=i) for i in range(WRITERS)]
    writes: list[int] = []
    reads: Counter[tuple[str, int]] = Counter()
    stop = threading.Event()

    def write(i: int) -> None:
        for _ in range(3):
            writes.append(upload(client, "hot", *uploads[i], replace=True).status_code)

    def read() -> None:
        while not stop.is_set():
            reads["get", client.get("/heads/hot").status_code] += 1
            r = client.post("/generate", json={"prompt": "1 + 1", "head": "hot", "max_new_tokens": 2})
            reads["generate", r.status_code] += 1
            listed = client.get("/heads").json()["heads"]
            reads["list", 200 if [(h["name"], h["status"]) for h in listed] == [("hot", "ready")] else 0] += 1

    readers = [threading.Thread(target=read) for _ in range(3)]
    for r in readers:
        r.start()
    try:
        while sum(reads.values()) < 9:  # the readers are going before the storm starts
            stop.wait(0.01)
        run_all([lambda i=i: write(i) for i in range(WRITERS)])
    finally:
        stop.set()
        for r in readers:
            r.join(60)
    assert writes == [201] * 3 * WRITERS
    assert {status for (_, status) in reads} == {200}, reads
    assert reads["generate", 200] > 3
    weights = (heads_dir / "hot" / WEIGHTS_NAME).read_bytes()
    assert weights in [w for _, w in uploads]  # one writer's whole head, the last to swap
    assert hidden(heads_dir) == [] and sorted(p.name for p in heads_dir.iterdir()) == ["hot"]


def test_concurrent_creates_of_one_name_get_one_201_and_409s(client: TestClient, base: Base, heads_dir: Path,
                                                             tmp_path: Path) -> None:
    uploads = [head_files(base, tmp_path, seed=i) for i in range(6)]
    answers: list[int] = []
    run_all([lambda i=i: answers.append(upload(client, "fresh", *uploads[i]).status_code) for i in range(6)])
    assert sorted(answers) == [201] + [409] * 5
    assert (heads_dir / "fresh" / WEIGHTS_NAME).read_bytes() in [w for _, w in uploads]
    assert hidden(heads_dir) == []


def test_deletes_and_replaces_of_one_name_are_serialised(client: TestClient, base: Base, heads_dir: Path,
                                                         tmp_path: Path) -> None:
    uploads = [head_files(base, tmp_path, seed=i) for i in range(4)]
    answers: Counter[tuple[str, int]] = Counter()

    def replace(i: int) -> None:
        for _ in range(3):
            answers["post", upload(client, "churn", *uploads[i], replace=True).status_code] += 1

    def delete() -> None:
        for _ in range(6):
            answers["delete", client.delete("/heads/churn").status_code] += 1

    def read() -> None:
        for _ in range(20):
            answers["get", client.get("/heads/churn").status_code] += 1

    run_all([lambda i=i: replace(i) for i in range(4)] + [delete, delete, read])
    assert answers["post", 201] == 12
    assert set(answers) <= {("post", 201), ("delete", 204), ("delete", 404), ("get", 200), ("get", 404)}, answers
    assert hidden(heads_dir) == []
    if (heads_dir / "churn").exists():  # whatever came last, it is whole
        _, meta = load_head(heads_dir / "churn", fingerprint=base.fingerprint)
        assert client.get("/heads/churn").json()["status"] == "ready"


def test_start_up_removes_leftovers_and_restores_a_name_lost_between_two_renames(
        make_client: Callable[..., TestClient], base: Base, heads_dir: Path) -> None:
    write_head(base, heads_dir / "kept")
    for leftover in (".kept.upload-0a1b", ".kept.tmp-2c3d", ".kept.deleted-4e5f", ".kept.old-6a7b",
                     ".gone.upload-8c9d"):
        write_head(base, heads_dir / leftover)
    write_head(base, heads_dir / ".lost.old-0f0f")  # the fallback swap crashed after renaming "lost" away
    (heads_dir / ".notes").mkdir()  # not a leftover of ours
    client = make_client()
    assert hidden(heads_dir) == [".notes"]
    listed = {h["name"]: h["status"] for h in client.get("/heads").json()["heads"]}
    assert listed == {"kept": "ready", "lost": "ready"}
    assert (heads_dir / "lost" / CONFIG_NAME).is_file()
