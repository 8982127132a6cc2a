"""Token labels: what ``step(tokens=...)`` accepts or refuses by name, labels decoded as the
tokenizer decodes them (``start`` and ``connect``), and text captures of remote runs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hf_support import bpe_tokenizer, tiny_gpt2
from stream_support import Served, Trainer, connect, run_async, small_encoder, step_until_frame
from test_remote import wait_for

from attnscope import Dashboard
from attnscope.core.capture import run_capture
from attnscope.training.run import Run, RunRegistry
from transformer_core.events import EventDispatcher

pytest.importorskip("transformers")
TEXT = "the cat sat on the mat.\n"


def test_mistaken_tokens_are_refused_by_name():
    run = Run(small_encoder(EventDispatcher()), run_id="toy")
    with pytest.raises(TypeError, match=r"a list of 2 strings; give one list of labels per"):
        run.step(0, tokens=["the", "cat"])
    with pytest.raises(ValueError, match=r"shape \(3,\); give \(N, L\), e.g. tokens.unsqueeze"):
        run.step(0, tokens=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match=r"tensor of torch.float32; token ids are integers"):
        run.step(0, tokens=torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"a dict with keys \['labels'\]; give its input_ids"):
        run.step(0, tokens={"labels": [[1, 2]]})
    with pytest.raises(ValueError, match=r"sample 1 has 1 labels, sample 0 has 2"):
        run.step(0, tokens=[["a", "b"], ["c"]])
    assert run.step_index is None  # none of these steps counted


def test_tokens_that_do_not_match_the_batch_are_refused():
    model = small_encoder(EventDispatcher())
    run = Run(model, run_id="toy")
    with torch.no_grad():
        model(torch.randn(8, 64, 8))
    with pytest.raises(ValueError, match=r"10 labels per sample, but the model's attention "
                                         r"saw 64 positions"):
        run.step(0, tokens=torch.zeros(8, 10, dtype=torch.long))
    run.step(0, tokens=torch.zeros(8, 64, dtype=torch.long))  # the right shape passes
    assert run.seq_len == 64 and run.labels(0) == ["0"] * 64
    # Later, a stray batch never stops training: said once, its labels not kept.
    with torch.no_grad():
        model(torch.randn(8, 64, 8))
    with pytest.warns(RuntimeWarning, match="these labels are not shown"):
        run.step(1, tokens=torch.ones(8, 10, dtype=torch.long))
    assert run.step_index == 1 and run.labels(0) == ["0"] * 64


def test_a_batch_encoding_is_accepted_and_labelled_as_the_tokenizer_decodes():
    tok = bpe_tokenizer()
    model = tiny_gpt2(len(tok))
    run = Run(model, run_id="gpt2", tokenizer=tok)
    batch = tok([TEXT, "a dog sat"], return_tensors="pt", padding=True)
    assert any(t.startswith("Ġ") for t in tok.convert_ids_to_tokens(batch["input_ids"][0]))
    run.step(0, tokens=batch)  # a BatchEncoding: its input_ids
    labels = run.labels(0)
    assert "".join(labels) == TEXT  # " cat", "\n": no "Ġ" or "Ċ"
    assert not any("Ġ" in x or "Ċ" in x for x in labels)


def test_labels_of_another_length_than_the_attention_warn_once():
    tok = bpe_tokenizer()
    model = tiny_gpt2(len(tok)).eval()
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    with Dashboard.start(model, port=0, quiet=True, tokenizer=tok) as dash:
        async def watch() -> None:
            ws = await connect(dash.url.replace("http", "ws") + "/ws")
            await ws.send(json.dumps({"type": "subscribe", "run": dash.run.id,
                                      "kinds": ["attention"], "layers": [0]}))
            def step(i: int) -> None:
                with torch.no_grad():
                    model(input_ids=ids)
                dash.step(i, tokens=ids[:, :3])  # 3 labels for L positions

            await step_until_frame(ws, step, "attention")
            for i in range(200, 203):
                step(i)
            await ws.close()

        with pytest.warns(RuntimeWarning, match=rf"3 labels per sample, but the attention has "
                                                rf"{ids.shape[1]} positions") as seen:
            run_async(watch)
    assert len([w for w in seen if "labels per sample" in str(w.message)]) == 1


def test_connect_with_a_tokenizer_labels_frames_and_captures_text():
    tok = bpe_tokenizer()
    model = tiny_gpt2(len(tok)).eval()
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    with Served(RunRegistry(), captures_timeout_s=5.0) as served:
        dash = Dashboard.connect(model, served.url, run="carol/bpe", tokenizer=tok)
        wait_for(lambda: dash.connections == 1, 10, "the publisher")
        try:
            async def watch() -> dict:
                ws = await connect(served.ws_url)
                await ws.send(json.dumps({"type": "subscribe", "run": "carol/bpe",
                                          "kinds": ["attention"], "layers": [1]}))
                def step(i: int) -> None:
                    with torch.no_grad():
                        model(input_ids=ids)
                    dash.step(i, tokens=ids)

                header, _ = await step_until_frame(ws, step, "attention", 300, 0.05)
                await ws.close()
                return header

            header = run_async(watch, timeout=60)
            assert "".join(header["labels"]["queries"]) == TEXT

            with Trainer(dash.run, model, ids, tokens=ids):  # captures run between steps
                created = served.http.post("/api/v1/captures", json={
                    "run": "carol/bpe", "text": [TEXT, "a cat"], "kinds": ["attention"]})
            assert created.status_code == 201, created.text
            meta = created.json()
        finally:
            dash.close()
        assert meta["input"] == {"kind": "text", "shape": [2, ids.shape[1]]}
        assert "".join(meta["labels"][0]) == TEXT
        assert meta["labels"][1][:2] == ["a", " cat"]
        data = served.http.get(meta["urls"]["npz"]).content
        with np.load(io.BytesIO(data)) as npz:
            got = {k: npz[k] for k in npz.files}
    assert got["tokens"][0].tolist() == ids[0].tolist()
    expected = run_capture(model, ids, ["attention"])  # the same text, alone
    np.testing.assert_allclose(got["attention.0"][0], expected["attention.0"][0].numpy(),
                               atol=1e-5)
