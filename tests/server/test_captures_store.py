"""CaptureStore: durable writes, crash recovery, concurrency, one owner per directory."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from attnscope.backend.captures import store as store_module
from attnscope.backend.captures.store import CaptureStore, StoreLocked

ROOT = Path(__file__).resolve().parents[2]


def arrays(value: float, n: int = 4) -> dict[str, np.ndarray]:
    return {"attention.0": np.full((1, 2, n, n), value, np.float32),
            "tokens": np.arange(n, dtype=np.int64)[None]}


def test_save_get_list_load_delete(tmp_path: Path) -> None:
    with CaptureStore(tmp_path) as store:
        first = store.save(arrays(1.0), run="a", name="one", meta={"kinds": ["attention"]})
        second = store.save(arrays(2.0), run="b")
        assert store.get(first.id).meta == {"kinds": ["attention"]}
        assert store.get(first.id).tensors["attention.0"] == {"shape": [1, 2, 4, 4],
                                                              "dtype": "float32"}
        items, total = store.list()
        assert [r.id for r in items] == [second.id, first.id] and total == 2  # newest first
        assert [r.id for r in store.list(run="a")[0]] == [first.id]
        assert [r.id for r in store.list(limit=1, offset=1)[0]] == [first.id]
        loaded = store.load(first.id)
        np.testing.assert_array_equal(loaded["attention.0"], arrays(1.0)["attention.0"])
        assert loaded["tokens"].dtype == np.int64
        assert first.tensor_bytes == 2 * 4 * 4 * 4 + 4 * 8
        assert store.delete(first.id) and not store.delete(first.id)
        assert store.get(first.id) is None and store.load(first.id) is None
        assert not (tmp_path / "files" / f"{first.id}.safetensors").exists()


def test_captures_persist_across_reopen(tmp_path: Path) -> None:
    with CaptureStore(tmp_path) as store:
        ids = [store.save(arrays(float(i)), run="r").id for i in range(3)]
    with CaptureStore(tmp_path) as store:
        assert [r.id for r in store.list()[0]] == ids[::-1]
        assert store.load(ids[1])["attention.0"][0, 0, 0, 0] == 1.0


def test_open_handle_survives_a_concurrent_delete(tmp_path: Path) -> None:
    with CaptureStore(tmp_path) as store:
        rec = store.save(arrays(3.0), run="r")
        _, f = store.open(rec.id)
        assert store.delete(rec.id)
        with f:
            assert len(f.read()) == rec.file_bytes


def test_recovery_removes_orphans_and_rows_without_files(tmp_path: Path) -> None:
    with CaptureStore(tmp_path) as store:
        kept = store.save(arrays(1.0), run="r")
        lost = store.save(arrays(2.0), run="r")
    files = tmp_path / "files"
    (tmp_path / "tmp" / "deadbeef.tmp").write_bytes(b"half a capture")  # crash before rename
    (files / ".tmpXYZ").write_bytes(b"a library's own temporary file")
    (files / "0123abcd.safetensors").write_bytes(b"renamed, never indexed")  # before commit
    (files / f"{lost.id}.safetensors").unlink()  # someone removed a file by hand
    with CaptureStore(tmp_path) as store:
        assert sorted(p.name for p in files.iterdir()) == [f"{kept.id}.safetensors"]
        assert list((tmp_path / "tmp").iterdir()) == []
        assert [r.id for r in store.list()[0]] == [kept.id]


@pytest.mark.parametrize("failing", ["write", "dir_fsync"])
def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       failing: str) -> None:
    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    def fsync_fails(path):
        raise OSError(5, "I/O error")

    if failing == "write":
        monkeypatch.setattr(store_module.safetensors.numpy, "save_file", disk_full)
    else:
        monkeypatch.setattr(store_module, "fsync_dir", fsync_fails)
    with CaptureStore(tmp_path) as store:
        with pytest.raises(OSError):
            store.save(arrays(1.0), run="r")
        assert store.list() == ([], 0)
        assert list((tmp_path / "files").iterdir()) == []
        assert list((tmp_path / "tmp").iterdir()) == []


def test_one_process_owns_a_store(tmp_path: Path) -> None:
    with CaptureStore(tmp_path):
        code = ("import sys; from attnscope.backend.captures.store import CaptureStore\n"
                f"CaptureStore({str(tmp_path)!r})")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode != 0 and "StoreLocked" in result.stderr
    with CaptureStore(tmp_path):  # released on close
        pass
    assert issubclass(StoreLocked, RuntimeError)


def test_concurrent_saves_and_deletes_stay_consistent(tmp_path: Path) -> None:
    with CaptureStore(tmp_path) as store:
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for i in range(25):
                    rec = store.save(arrays(float(i), n=8), run=f"w{seed}")
                    if rng.random() < 0.5:  # nobody else deletes a worker's own run
                        assert store.delete(rec.id)
                    store.save(arrays(float(i), n=8), run="shared")
                    store.list(limit=5)
                    shared = [r for r in store.list(limit=10)[0] if r.run == "shared"]
                    if shared and rng.random() < 0.3:
                        store.delete(shared[-1].id)  # may race with another deleter: fine
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        items, total = store.list(limit=500)
        assert total == len(items)
        on_disk = {p.name for p in (tmp_path / "files").iterdir()}
        assert on_disk == {f"{r.id}.safetensors" for r in items}
        for r in items:
            assert store.load(r.id)["attention.0"].shape == (1, 2, 8, 8)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from attnscope.backend.captures.store import CaptureStore
    store = CaptureStore(sys.argv[1])
    for i in range(100000):
        value = float(i)
        store.save({"a": np.full((256, 1024), value, np.float32)}, run="crash",
                   meta={"value": value})
        print(i, flush=True)
""")


@pytest.mark.slow
def test_sigkill_during_many_writes_leaves_only_complete_captures(tmp_path: Path) -> None:
    """Kill a writer at random moments (3 rounds); every listed capture reads back whole."""
    rng = random.Random(0)
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            for _ in range(3 + round_):  # wait until it is writing
                assert proc.stdout.readline(), "writer died before writing"
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(30)
            proc.stdout.close()
        with CaptureStore(tmp_path) as store:
            items, total = store.list(limit=500)
            assert total >= 3
            for record in items:
                data = store.load(record.id)["a"]
                assert data.shape == (256, 1024)
                assert (data == record.meta["value"]).all()
            assert list((tmp_path / "tmp").iterdir()) == []
            names = {p.name for p in (tmp_path / "files").iterdir()}
            assert names == {f"{r.id}.safetensors" for r in items}
