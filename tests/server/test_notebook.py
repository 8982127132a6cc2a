"""A dashboard in a Jupyter kernel (nbclient + ipykernel, a real kernel): shown inline, a
capture answered at once between cells (nobody trains), a cell run twice leaving one
server, an interrupted cell leaving the run stopped, not live. And ``dash.wait()`` serving
a script with no training loop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]

SETUP = textwrap.dedent("""
    import json, torch
    from transformer_core.builders import TransformerEncoderBuilder
    from attnscope import Dashboard
    from attnscope.settings import Settings
    torch.manual_seed(0)
    model = TransformerEncoderBuilder.from_kwargs(n_layers=2, n_heads=2, query_dimensions=4,
        value_dimensions=4, feed_forward_dimensions=16).get()
""")
START = ("dash = Dashboard.start(model, port={port}, quiet=True, name='nb', "
         "settings=Settings(data_dir={data!r}))\n"
         "print(json.dumps({{'url': dash.url, 'child': dash._process.proc.pid}}))\n"
         "dash")
TRAIN = textwrap.dedent("""
    import time
    for step in range(100_000):  # interrupted by the test
        model(torch.randn(1, 6, 8))
        dash.step(step, loss=1.0)
        time.sleep(0.01)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A notebook client with a live kernel of this interpreter; cells run one by one."""
    spec = tmp_path / "jupyter" / "kernels" / "attnscope-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "attnscope tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.v4.new_notebook()
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="attnscope-test",
                                     resources={"metadata": {"path": str(ROOT)}})
    with client.setup_kernel():
        def run(code: str) -> list[dict]:
            cell = nbformat.v4.new_code_cell(code)
            nb.cells.append(cell)
            client.execute_cell(cell, len(nb.cells) - 1)
            return cell.outputs

        run.client = client
        yield run


def _printed(outputs: list[dict]) -> dict:
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    return json.loads(text.strip().splitlines()[-1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_dashboard_in_a_notebook(kernel, tmp_path) -> None:
    port = _free_port()
    kernel(SETUP)
    outputs = kernel(START.format(port=port, data=str(tmp_path / "data")))
    first = _printed(outputs)
    [shown] = [o for o in outputs if o["output_type"] == "execute_result"]
    inline = shown["data"]["text/html"]
    assert inline.startswith("<iframe") and f'src="{first["url"]}"' in inline

    # Nobody trains: a capture runs at once, from the kernel's event loop between cells.
    t0 = time.monotonic()
    answer = httpx.post(first["url"] + "/api/v1/captures", timeout=30,
                        json={"run": "nb", "features": [[[0.5] * 8] * 5],
                              "kinds": ["attention"]})
    assert answer.status_code == 201, answer.text
    assert time.monotonic() - t0 < 2.0
    assert answer.json()["tensors"]["attention.1"]["shape"] == [1, 2, 5, 5]

    # The cell run again: one server, on the same port; the first server process is gone.
    second = _printed(kernel(START.format(port=port, data=str(tmp_path / "data"))))
    assert second["url"] == first["url"] and second["child"] != first["child"]
    deadline = time.monotonic() + 10
    while _alive(first["child"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(first["child"])
    assert httpx.get(second["url"] + "/api/v1/runs/nb", timeout=10).json()["status"] == "live"

    # A training cell interrupted: the run is stopped, not live.
    client = kernel.client
    cell = nbformat.v4.new_code_cell(TRAIN)
    client.nb.cells.append(cell)

    def interrupt_soon() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run = httpx.get(second["url"] + "/api/v1/runs/nb", timeout=10).json()
            if (run["step"] or 0) >= 20:
                break
            time.sleep(0.1)
        # what Jupyter's "interrupt" does to a local kernel: SIGINT
        os.kill(client.km.provisioner.process.pid, signal.SIGINT)

    import threading

    interrupter = threading.Thread(target=interrupt_soon)
    interrupter.start()
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="KeyboardInterrupt"):
        client.execute_cell(cell, len(client.nb.cells) - 1)
    interrupter.join()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        run = httpx.get(second["url"] + "/api/v1/runs/nb", timeout=10).json()
        if run["status"] != "live":
            break
        time.sleep(0.1)
    assert run["status"] == "idle" and run["step"] >= 20  # stopped at its last step
    kernel("dash.close()")
    assert not _alive(second["child"]) or time.sleep(2) or not _alive(second["child"])


def test_wait_serves_captures_in_a_script_with_no_training_loop(tmp_path) -> None:
    script = tmp_path / "look_at_model.py"
    script.write_text(SETUP + textwrap.dedent(f"""
        dash = Dashboard.start(model, port=0, quiet=True, name='inspect',
                               settings=Settings(data_dir={str(tmp_path / 'data')!r}))
        print(json.dumps({{'url': dash.url}}), flush=True)
        dash.wait(timeout=60)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        url = json.loads(proc.stdout.readline())["url"]
        t0 = time.monotonic()
        answer = httpx.post(url + "/api/v1/captures", timeout=30,
                            json={"run": "inspect", "features": [[[0.5] * 8] * 4]})
        assert answer.status_code == 201, answer.text
        assert time.monotonic() - t0 < 2.0
        [run] = [r for r in httpx.get(url + "/api/v1/runs", timeout=10).json()
                 if r["id"] == "inspect"]
        assert run["status"] == "idle"  # nobody trains: stopped, not live
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
