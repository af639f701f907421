"""Run configs: YAML + dotted overrides into frozen dataclasses; every mistake is a clear error."""
from dataclasses import dataclass, field
from typing import Optional

import pytest
import yaml

from launch.runtime.config import ConfigError, RunConfig, TrainConfig, dump_config, load_config, resolve_path, to_dict


@dataclass(frozen=True)
class Inner:
    depth: int = 2
    ratio: float = 0.5
    scale: tuple[float, float] = (0.2, 1.0)


@dataclass(frozen=True)
class Schema:
    name: str = "x"
    inner: Inner = field(default_factory=lambda: Inner(depth=7))
    train: TrainConfig = field(default_factory=TrainConfig)
    langs: tuple[str, ...] = ("en", "ko")
    lr: Optional[float] = None


def test_defaults_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run1\ninner:\n  ratio: 0.75\ntrain:\n  steps: 5\n")
    cfg = load_config(Schema, str(p), ["inner.scale=[0.1, 0.9]", "train.steps=9", "lr=3e-4", "langs=[ko]"])
    assert cfg.name == "run1"
    assert cfg.inner == Inner(depth=7, ratio=0.75, scale=(0.1, 0.9))  # schema default depth=7 kept
    assert cfg.train.steps == 9 and cfg.train.micro_batch_size == TrainConfig().micro_batch_size
    assert cfg.lr == 3e-4 and cfg.langs == ("ko",)
    with pytest.raises(Exception):
        cfg.name = "changed"  # frozen


def test_int_accepted_for_float_and_null_for_optional():
    cfg = load_config(Schema, None, ["inner.ratio=1", "lr=null"])
    assert cfg.inner.ratio == 1.0 and isinstance(cfg.inner.ratio, float) and cfg.lr is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.detph=3", "unknown key 'inner.detph'"),
        ("bogus=1", "unknown key 'bogus'"),
        ("inner.depth=2.5", "'inner.depth' expects an integer"),
        ("inner.depth=true", "'inner.depth' expects an integer"),
        ("train.steps=abc", "'train.steps' expects an integer"),
        ("inner.scale=[1, 2, 3]", "'inner.scale' expects 2 values"),
        ("inner=5", "inner: expected a mapping"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(Schema, None, [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Schema, str(p))
    assert "train.stepz" in str(e.value) and "bad.yaml" in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Schema, str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Schema, str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Schema, str(tmp_path / "broken.yaml"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Schema, None, ["inner.depth=3", "train.precision=bf16"])
    (tmp_path / "config.yaml").write_text(dump_config(cfg))  # what the run folder's config.yaml holds
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data == to_dict(cfg) and data["inner"]["scale"] == [0.2, 1.0]
    assert load_config(Schema, str(tmp_path / "config.yaml")) == cfg


def test_resolve_path_falls_back_to_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("data/emoji/captions.jsonl").endswith("data/emoji/captions.jsonl")
    from pathlib import Path

    assert Path(resolve_path("data/emoji/captions.jsonl")).is_file()
    assert resolve_path("shards/{000000..000002}.tar") == "shards/{000000..000002}.tar"


def test_run_config_defaults():
    assert RunConfig().log_every > 0 and TrainConfig().precision == "fp32"


def test_choices_and_ranges_fail_at_load_naming_file_and_key(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  precision: fp17\n")
    with pytest.raises(ConfigError, match=r"'train.precision' must be one of fp32, bf16, fp16, got 'fp17' \(.*run.yaml\)"):
        load_config(Schema, str(p))
    with pytest.raises(ConfigError, match=r"^train\.steps must be >= 1, got 0 \(command line\)$"):
        load_config(Schema, None, ["train.steps=0"])
    with pytest.raises(ConfigError, match="'train.zero_stage' must be one of 0, 1, 2, got '2'"):
        load_config(Schema, None, ["train.zero_stage='2'"])  # a string is not the integer 2


def _stage(args, **kw):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "launch" / "mae.py"), *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_stage_help_lists_every_key_and_print_config_resolves(tmp_path):
    from launch.runtime.cli import describe
    from launch.stages.mae import MAERunConfig

    r = _stage(["--help", "train.steps=7"])
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.startswith("  ") and "." in line.split()[0]}
    keys = [k for k, _, _ in describe(MAERunConfig())]
    assert len(keys) > 40 and set(k for k in keys if "." in k) <= set(listed)
    assert listed["train.precision"] == ["fp32|bf16|fp16", "fp32"] and listed["train.steps"] == ["int", "7"]
    assert listed["data.scale"] == ["[float,", "float]", "[0.2,", "1.0]"]

    r = _stage(["--print-config", "train.steps=7", f"run.out_dir={tmp_path / 'x'}"])
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["train"]["steps"] == 7 and printed["model"]["encoder"]["embed_dim"] == 768
    assert not (tmp_path / "x").exists()  # nothing started, nothing written

    r = _stage(["train.precision=fp17"])
    lines = r.stderr.strip().splitlines()  # (a library may warn on import before it)
    assert r.returncode == 2 and "Traceback" not in r.stderr and [x for x in lines if "error" in x] == lines[-1:] == [
        "error: 'train.precision' must be one of fp32, bf16, fp16, got 'fp17' (command line)"]


def test_clip_print_config_works_before_a_tokenizer_exists(tmp_path):
    """A fresh clone has no tokenizer yet: --print-config still prints the config (what the
    tokenizer and --init would fill in left as configured) and says what is missing."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "launch" / "clip.py"
    r = subprocess.run([sys.executable, str(script), "--print-config", f"data.tokenizer={tmp_path / 'none'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["data"]["tokenizer"] == str(tmp_path / "none") and printed["model"]["text"]["vocab_size"] == 98304
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"note: printed without what the tokenizer and --init decide: data.tokenizer={tmp_path / 'none'}: ")
