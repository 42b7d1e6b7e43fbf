import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from gen_core.config import (
    ConfigError,
    describe,
    dump_yaml,
    from_dict,
    load_config,
    parse_overrides,
    setting,
    to_dict,
)
from gen_core.runs import RunConfig
from worldmodels.cli import main as wm
from worldmodels.layout import M_FOLDER, RunLayout
from worldmodels.stages import GEN_STAGES, SECTIONS, STAGES


@dataclass
class Inner:
    width: int = setting(32, "channels", min=1)


@dataclass
class Demo(RunConfig):
    epochs: int = setting(3, "passes", min=1)
    lr: float = setting(1e-3, "learning rate", min=0.0, min_inclusive=False)
    mode: Literal["a", "b"] = setting("a", "mode")
    layers: list[int] = setting([1, 2], "sizes")
    opt: int | None = setting(None, "optional", min=1)
    inner: Inner = field(default_factory=Inner, metadata={"doc": "nested"})


def test_defaults_and_overrides_with_nesting(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 5\ninner:\n  width: 8\n")
    cfg = load_config(Demo, f, ["lr=0.1", "inner.width=16", "layers=[3, 4]", "run_name=42"])
    assert (cfg.epochs, cfg.lr, cfg.inner.width, cfg.layers) == (5, 0.1, 16, [3, 4])
    assert cfg.run_name == "42"
    assert isinstance(cfg.lr, float)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"epoch": 3}, "epoch: unknown setting"),
        ({"epochs": "three"}, "epochs: expected an integer"),
        ({"epochs": 0}, "epochs: expected a value >= 1"),
        ({"lr": 0.0}, "lr: expected a value > 0.0"),
        ({"mode": "c"}, "mode: expected one of 'a', 'b'"),
        ({"inner": {"width": -1}}, "inner.width: expected a value >= 1"),
        ({"inner": {"depth": 1}}, "inner.depth: unknown setting"),
        ({"epochs": True}, "epochs: expected an integer"),
        ({"opt": 0}, "opt: expected a value >= 1"),
        ({"run_name": "a/b"}, "run_name: expected a plain folder name"),
        ({"device": "tpu"}, "device: expected auto"),
    ],
)
def test_validation_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Demo, data)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


@dataclass
class Texts:
    prompt: str = setting("", "text typed on the command line")
    name: str | None = setting(None, "optional text")
    params: dict = setting({}, "free-form mapping")
    count: int = setting(1, "a number")


def test_command_line_text_stays_as_typed():
    cfg = load_config(
        Texts, None, ["prompt=ROMEO:", "name=yes", "params.action=[0, 1, 0]", "count=3"]
    )
    assert cfg.prompt == "ROMEO:" and cfg.name == "yes" and cfg.count == 3
    assert cfg.params == {"action": [0, 1, 0]}
    assert load_config(Texts, None, ["name=null", "prompt=007"]) == Texts(prompt="007")
    import yaml

    yaml.safe_dump(to_dict(cfg))  # plain data only: the resolved config can be written


def test_parse_overrides_types():
    parsed = parse_overrides(["a.b=3", "c=true", "d=x y", "e=1e-3"])
    assert (parsed["a"]["b"].parsed, parsed["c"].parsed, parsed["d"].parsed) == (3, True, "x y")
    assert parsed["c"] == "true"  # the text as typed is kept too
    assert from_dict(Demo, {"lr": "1e-3"}).lr == 1e-3  # YAML 1.1 leaves "1e-3" a string
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["novalue"])


def test_pipeline_file_sections(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("seed: 7\nrun_name: r\nmain:\n  epochs: 2\nother:\n  zzz: 1\n")
    cfg = load_config(Demo, f, section="main", other_sections=("other",))
    assert (cfg.seed, cfg.run_name, cfg.epochs) == (7, "r", 2)


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Demo, f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Demo, tmp_path / "nope.yaml")


def test_dump_and_describe_roundtrip():
    cfg = from_dict(Demo, {"epochs": 4})
    import yaml

    again = from_dict(Demo, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    keys = [k for k, _, _ in describe(Demo)]
    assert "inner.width" in keys and "epochs" in keys


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["collect", "episodes=-1"], "episodes: expected a value >= 1, got -1"),
        (["collect", "workers=0"], "workers: expected a value >= 1, got 0"),
        (["collect", "episodes=many"], "episodes: expected an integer"),
        (["collect", "colour=red"], "colour: unknown setting"),
        (["collect", "--config", "/nonexistent.yaml"], "config file not found"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(args, fragment, capsys):
    assert wm(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wm collect: error: ") and fragment in err, err
    assert len(err.splitlines()) == 1


def test_cli_help_lists_commands_and_settings(capsys):
    with pytest.raises(SystemExit) as e:
        wm(["--help"])
    assert e.value.code == 0
    assert "collect" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        wm(["collect", "--help"])
    out = capsys.readouterr().out
    assert "episodes=16" in out and "ray_address" in out


def test_cli_lists_every_stage_of_the_registry(capsys):
    with pytest.raises(SystemExit):
        wm(["--help"])
    out = capsys.readouterr().out
    assert all(stage.name in out for stage in STAGES)


def test_registry_points_at_real_stages_and_pipeline_sections():
    from worldmodels.pipeline import PipelineConfig

    for stage in STAGES + GEN_STAGES:
        cls, func = stage.load()
        assert dataclasses.is_dataclass(cls) and callable(func), stage.name
    # The pipeline file has one section per stage that reads one.
    assert set(SECTIONS) <= {f.name for f in dataclasses.fields(PipelineConfig)}
    assert len(set(SECTIONS)) == len(SECTIONS)


def test_run_layout_names_rounds_and_finds_the_last(tmp_path):
    layout = RunLayout.of(from_dict(RunConfig, {"runs_dir": str(tmp_path), "run_name": "r"}))
    assert layout == RunLayout(tmp_path / "r")
    assert layout.m(0) == tmp_path / "r" / M_FOLDER
    assert layout.m_checkpoints(2) == tmp_path / "r" / f"{M_FOLDER}_iter2" / "checkpoints"
    assert layout.controller(1).name == "controller_iter1"
    assert layout.score("random") == tmp_path / "r" / "evaluate" / "random" / "score.json"
    assert layout.last_round() == 0  # no round beyond the first pass
    layout.controller_checkpoints(2).mkdir(parents=True)
    layout.controller(3).mkdir()  # no checkpoints yet: round 3 is not finished
    (tmp_path / "r" / "controller_iterx" / "checkpoints").mkdir(parents=True)
    assert layout.last_round() == 2


def test_run_layout_names_draws_of_c_and_follows_the_kept_one(tmp_path):
    layout = RunLayout(tmp_path / "r")
    assert layout.controller(1, 1).name == "controller_iter1_d1"
    assert layout.controller(0) == layout.controller(0, 0) and layout.kept_draw(0) == 0
    layout.pipeline.mkdir(parents=True)
    layout.draws.write_text(json.dumps({"1": {"kept": 2, "pick_returns": [1.0, 0.0, 3.0]}}))
    assert layout.controller_checkpoints(1) == layout.controller(1, 2) / "checkpoints"
    assert layout.controller(0).name == "controller"  # round 0 has no record: draw 0
    assert layout.m(1).name == "m_iter1"  # draws share M
    layout.controller_checkpoints(1, 2).mkdir(parents=True)  # a draw is not a round
    assert layout.last_round() == 0
