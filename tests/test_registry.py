"""Adding an algorithm touches one file: a toy algorithm defined here alone, with its own config
keys and an extra evaluation metric, validates, documents itself and trains through the CLI."""

import json
from dataclasses import dataclass

import pytest

from rsmatch import registry
from rsmatch.algorithms.base import EvalContext, FixMatch
from rsmatch.cli.train import main as train_main
from rsmatch.config import check, config_docs, load_config, option

from .conftest import tiny_overrides


@dataclass
class ToyConfig:
    scale: float = option(2.0, "Multiplies the unlabeled loss.")

    def validate(self) -> None:
        check(self.scale > 0, "toymatch.scale", self.scale, "must be positive")


@pytest.fixture
def toymatch():
    @registry.register_algorithm("toymatch", ToyConfig)
    class ToyMatch(FixMatch):
        def step(self, model, batch, ctx):
            out = super().step(model, batch, ctx)
            out.losses["loss_u"] = self.cfg.toymatch.scale * out.losses["loss_u"]
            return out

        def evaluate(self, ev: EvalContext) -> dict[str, float]:
            preds = ev.predict(lambda x: self.classifier(ev.ema)(x)["logits"], ev.data.unlabeled)
            return {"toy_pool_class0": float((preds == 0).float().mean())}

    yield ToyMatch
    registry._REGISTRY.pop("toymatch")  # (monkeypatch.delitem would put it back at teardown)


def test_toy_algorithm_has_config_docs_and_validation(toymatch):
    cfg = load_config(None, ["algorithm=toymatch", "toymatch.scale=3"])
    assert cfg.toymatch.scale == 3.0
    assert "`toymatch.scale`" in config_docs()
    with pytest.raises(ValueError, match=r"^toymatch.scale=-1.0: must be positive"):
        load_config(None, ["algorithm=toymatch", "toymatch.scale=-1"])
    with pytest.raises(ValueError, match=r"^toymatch.nope: unknown key"):
        load_config(None, ["toymatch.nope=1"])


def test_toy_algorithm_trains_through_the_cli(toymatch, sources, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main(tiny_overrides(sources, out, algorithm="toymatch", **{"toymatch.scale": 3}))
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["algorithm"] == "toymatch"
    assert 0.0 <= metrics["toy_pool_class0"] <= 1.0
    evals = [
        json.loads(line) for line in (out / "evals.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert all("toy_pool_class0" in e for e in evals)
    assert (out / "model" / "model.safetensors").is_file()


def test_unknown_algorithm_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"^algorithm='nope': one of .*fixmatch.*rsmatch"):
        load_config(None, ["algorithm=nope"])


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="registered already"):

        @registry.register_algorithm("fixmatch")
        class Other(FixMatch):
            pass

    assert registry.algorithms()["fixmatch"].cls is FixMatch
