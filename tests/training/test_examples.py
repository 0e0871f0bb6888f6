"""The example configs in ``examples/``: each is a valid ``beyondlora train`` config that states its algorithm's
usual learning rate, is listed in README.md, and trains a step as written on the tiny offline model of its
family (only the base model, the data, the output folder and the run's length are replaced)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train_config import make_dataset

from beyondlora.cli import main
from beyondlora.training.settings import TrainConfig, default_learning_rate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
#: the offline stand-in of each family's base model, by file-name prefix
TINY = {"demo": "demo", "sd15": "tiny-sd", "sd2": "tiny-sd", "sdxl": "tiny-sdxl"}


def _family(example: Path) -> str:
    return example.stem.split("-")[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_every_family_and_main_algorithm_has_an_example() -> None:
    assert {_family(e) for e in EXAMPLES} == set(TINY)
    algos = {TrainConfig.from_sources(str(e), {}).algo for e in EXAMPLES}
    assert {"lora", "lokr", "loha", "ia3", "diag-oft", "boft", "glora"} <= algos


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_example_is_valid_listed_and_states_the_usual_learning_rate(example: Path) -> None:
    config = TrainConfig.from_sources(str(example), {})
    config.validate()
    assert config.learning_rate == default_learning_rate(config.algo, _family(example) == "demo")
    assert f"examples/{example.name}" in (ROOT / "README.md").read_text()
    assert example.read_text().startswith("# "), "each example opens with what it is for"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_example_trains_a_step_on_its_tiny_model(example: Path, data: Path, tmp_path: Path) -> None:
    config = TrainConfig.from_sources(str(example), {})
    stand_in = ["--pretrained-model", TINY[_family(example)], "--output-dir", str(tmp_path / "run")]
    if config.train_data_dir is not None:
        stand_in += ["--train-data-dir", str(data)]
    if config.resolution is not None and _family(example) != "demo":
        stand_in += ["--resolution", "64"]  # the tiny models' side
    short = ["--max-steps", "1", "--warmup-steps", "0", "--save-every", "0", "--sample-every", "0"]
    short += ["--sample-steps", "1", "--sample-seeds", "0", "--mixed-precision", "no"]
    assert main(["train", str(example), *stand_in, *short]) == 0
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
