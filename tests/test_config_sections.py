"""The config sections: every flag, YAML key, config.yaml line and resume rule comes from the
fields' metadata (a field added to a section is all of them), and the files written before the
config had sections (tests/data/v1_run: the config.yaml and the checkpoint's config dict of a
1-epoch run) still load, resume and write back the same, their `sched: step` with a
`decay_epochs` list of milestones read as today's `sched: multistep` with those
`decay_milestones` (the same schedule)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from automix_fast.config import (FIELDS, FLAT_ORDER, RESUMABLE_FIELDS, SECTION_OF, SECTIONS, TrainConfig, build_config,
                                 config_changes, config_yaml, load_yaml, resumed_config)
from automix_fast.engine.checkpoint import load_checkpoint
from automix_fast.engine.schedule import build_schedule
from automix_fast.errors import ConfigError
from faultkit import ENV

STORED = Path(__file__).parent / "data" / "v1_run"
# What the stored run resolved from null/auto (its config.yaml marks each with "# resolved from").
RESOLVED = {"dataset": "folder", "aug": "cifar", "num_classes": 3, "validation_batch_size": 16, "warmup_epochs": 0.25,
            "mix_alpha": 2.0, "mix_stage": 3, "amp": False, "channels_last": False}
# The stored run's step schedule (milestones in `decay_epochs`, as configs of its version hold
# them) as today's fields read it: multistep at those milestones, by the same factor 0.1.
READ_AS = {"sched": "multistep", "decay_epochs": None, "decay_milestones": [1], "decay_rate": 0.1}
# Fields added after the stored run (at their defaults, but for the milestones read from
# decay_epochs): their lines follow the stored ones.
ADDED = {"crop_padding_mode": "zeros", "crop_pct": None, "train_interpolation": "bilinear", "interpolation": "bilinear",
         "mean": None, "std": None, "q_batched": False, "decay_milestones": [1], "decay_rate": 0.1,
         "torchcompile_mode": None, "torchcompile_scope": "encoders", "cuda_graph": False}
ADDED_LINES = ("crop_padding_mode: zeros\ncrop_pct: null\ntrain_interpolation: bilinear\ninterpolation: bilinear\n"
               "mean: null\nstd: null\nq_batched: false\ndecay_milestones:\n- 1\ndecay_rate: 0.1\n"
               "torchcompile_mode: null\ntorchcompile_scope: encoders\ncuda_graph: false\n")


def read_as_today(text: str) -> str:
    """A config.yaml of the stored run with its schedule lines as today's writer puts them."""
    assert "sched: step\ndecay_epochs:\n- 1\n" in text
    return text.replace("sched: step\ndecay_epochs:\n- 1\n", "sched: multistep\ndecay_epochs: null\n")


def marked_as_today(text: str) -> str:
    """A config.yaml of the stored run (its version wrote `amp: false  # resolved from null`) as
    today's writer marks it: what was asked, then what it ran as (`amp: null  # ran as false`)."""
    return re.sub(r"(?m)^(\w+): (.*)  # resolved from (.*)$", r"\1: \3  # ran as \2", text)


def test_config_yaml_asks_again_for_what_the_run_left_to_null_or_auto(tmp_path):
    cfg = build_config(overrides={"mix": "mixup", "lr": 0.2})
    ran = {"amp": False, "channels_last": False, "kernel_backend": "torch", "dataset": "folder", "num_classes": 3,
           "validation_batch_size": 128, "warmup_epochs": 0.25, "mix_alpha": 1.0, "img_size": 32}
    text = config_yaml(cfg, ran)
    assert "amp: null  # ran as false\n" in text and "dataset: auto  # ran as folder\n" in text
    assert "kernel_backend: auto  # ran as torch\n" in text and "mix_alpha: null  # ran as 1.0\n" in text
    (tmp_path / "config.yaml").write_text(text)
    again = build_config(load_yaml(str(tmp_path / "config.yaml")), {"batch_size": 32})
    assert again.to_flat() == {**cfg.to_flat(), "batch_size": 32}  # nothing pinned: worked out again


def test_every_field_is_declared_once_with_help_and_a_section():
    names = [f.name for s in SECTIONS for f in __import__("dataclasses").fields(s.type_)]
    assert len(names) == len(set(names)) == len(FIELDS) == len(FLAT_ORDER)
    assert all(FIELDS[k].metadata["help"] for k in names)
    cfg = TrainConfig()
    for k in names:  # cfg.<section>.<field> for every flat name
        assert getattr(getattr(cfg, SECTION_OF[k]), k) == FIELDS[k].default
    assert set(RESUMABLE_FIELDS) == {k for k in names if FIELDS[k].metadata["resumable"]}
    assert {"epochs", "workers", "device"} <= set(RESUMABLE_FIELDS) and "lr" not in RESUMABLE_FIELDS


def test_stored_config_yaml_loads_and_writes_back_the_same_lines():
    text = (STORED / "config.yaml").read_text()
    cfg = build_config(load_yaml(str(STORED / "config.yaml")))
    assert (cfg.optim.lr, cfg.schedule.sched, cfg.schedule.decay_milestones, cfg.mixing.mask_loss_anneal,
            cfg.data.num_classes) == (0.05, "multistep", [1], "cosine", 3)
    # Loaded, every resolved value is explicit: the same file without its "# resolved from" marks.
    unmarked = "".join(line.split("  # resolved from")[0] + "\n" for line in text.splitlines())
    assert config_yaml(cfg) == read_as_today(unmarked) + ADDED_LINES
    assert list(cfg.to_flat()) == list(yaml.safe_load(text)) + list(ADDED)  # the same keys in the same order


def test_stored_checkpoint_config_resumes_and_writes_the_same_config_yaml():
    path = STORED / "last.pt"
    state = load_checkpoint(path)
    stored = state["config"]
    cfg = resumed_config((str(path), state), {"resume": str(path), "epochs": 2, "workers": 0})
    flat = cfg.to_flat()
    assert flat["epochs"] == 2 and flat["experiment"] == "v1_run" and flat["output"] == str(STORED.resolve().parent)
    assert {k: v for k, v in flat.items() if k not in ("epochs", "experiment", "output", "resume")} == \
        {k: v for k, v in stored.items() if k not in ("epochs", "experiment", "output", "resume")} | ADDED | READ_AS
    assert config_changes(stored, cfg) == []
    # The same learning rates as the step schedule it was trained with: x0.1 from epoch 1 on.
    schedule = build_schedule(cfg.schedule.sched, [0.05], total_steps=20, steps_per_epoch=10,
                              decay_epochs=cfg.schedule.decay_epochs, decay_milestones=cfg.schedule.decay_milestones,
                              decay_rate=cfg.schedule.decay_rate)
    assert [schedule.lr_at(i)[0] for i in (9, 10, 19)] == pytest.approx([0.05, 0.005, 0.005])
    # The run's config.yaml is what today's writer makes of the stored config and what it resolved.
    written = marked_as_today(read_as_today((STORED / "config.yaml").read_text()))
    assert config_yaml(build_config(stored), RESOLVED) == written + ADDED_LINES
    with pytest.raises(ConfigError, match=r"--lr \(0.05 -> 0.2\) cannot change on resume"):
        resumed_config((str(path), state), {"resume": str(path), "lr": 0.2})


def test_a_field_the_stored_run_predates_reads_as_what_it_ran_as_and_cannot_change_on_resume():
    """A checkpoint written before the view fields ran with ImageNet's mean/std and zero padding:
    a recipe that now sets them (CIFAR-100's) is a change on resume, not a silent new value."""
    path = STORED / "last.pt"
    state = load_checkpoint(path)
    assert "mean" not in state["config"]
    recipe = {"mean": [0.5071, 0.4865, 0.4409], "crop_padding_mode": "reflect"}
    with pytest.raises(ConfigError, match=r"--mean \(None -> \[0.5071, 0.4865, 0.4409\]\), --crop-padding-mode "
                                          r"\('zeros' -> 'reflect'\) cannot change on resume"):
        resumed_config((str(path), state), {"resume": str(path), **recipe})
    forced = resumed_config((str(path), state), {"resume": str(path), "allow_config_change": True, **recipe})
    assert config_changes(state["config"], forced) == ["crop_padding_mode", "mean"]


def test_a_config_file_may_group_its_keys_by_section(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim: {lr: 0.2, opt: adamw}\ndata:\n  batch_size: 6\nepochs: 3\n")
    cfg = build_config(load_yaml(str(nested)))
    assert (cfg.optim.lr, cfg.optim.opt, cfg.data.batch_size, cfg.schedule.epochs) == (0.2, "adamw", 6, 3)
    nested.write_text("optim: {batch_size: 6}\n")  # a field of another section
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.batch_size' in"):
        load_yaml(str(nested))


def test_base_is_read_beside_the_file_else_shipped_never_from_the_current_folder(tmp_path, monkeypatch):
    from automix_fast.config import CONFIG_DIR

    run, cwd = tmp_path / "run", tmp_path / "cwd"
    run.mkdir(), cwd.mkdir()
    (cwd / "cifar100_r18_automix.yaml").write_text("lr: 9.0\n")  # a stray file named like a shipped base
    (cwd / "mine.yaml").write_text("lr: 9.0\n")
    monkeypatch.chdir(cwd)
    (run / "c.yaml").write_text("base: cifar100_r18_automix.yaml\nepochs: 3\n")
    assert load_yaml(str(run / "c.yaml")) == {**load_yaml(f"{CONFIG_DIR}/cifar100_r18_automix.yaml"), "epochs": 3}
    (run / "mine.yaml").write_text("lr: 0.3\n")
    (run / "d.yaml").write_text("base: mine.yaml\n")
    assert load_yaml(str(run / "d.yaml")) == {"lr": 0.3}
    (run / "mine.yaml").unlink()
    with pytest.raises(ConfigError, match=r"^base: mine.yaml in .*d.yaml is neither beside it nor a shipped config"):
        load_yaml(str(run / "d.yaml"))


@pytest.mark.parametrize("text", ["lr: 0.1\noptim: {lr: 0.2}\n", "optim: {lr: 0.2}\nlr: 0.1\n"])
def test_a_key_given_flat_and_in_its_section_is_a_one_line_error(tmp_path, text):
    both = tmp_path / "both.yaml"
    both.write_text(text)
    with pytest.raises(ConfigError, match=r"^config key 'lr' is given twice in .*both.yaml, flat and in its section "
                                          r"'optim'; keep one$"):
        load_yaml(str(both))


# A field added to one section (and nothing else) in a fresh interpreter: its flag, --help line,
# YAML key, config.yaml line, checkpoint key and resume rule all follow.
FAKE_FIELD = r"""
from __future__ import annotations
import importlib, json, sys
from dataclasses import dataclass
import automix_fast.config as config
import automix_fast.config.sections as sections
from automix_fast.config.fields import option, require

@dataclass
class RunOptions(sections.RunOptions):
    fake_knob: int = option(3, "a knob only this test has")

    def check(self):
        super().check()
        require(self.fake_knob >= 1, "fake_knob", "must be at least 1", self.fake_knob)

sections.RunOptions = RunOptions
importlib.reload(config)
from automix_fast.cli import build_parser, main
from automix_fast.engine.checkpoint import load_checkpoint

data, out = sys.argv[1], sys.argv[2]
train = ["train", "--data-dir", data, "--img-size", "32", "--epochs", "1", "-b", "8", "--kernel-backend", "torch",
         "--loader", "torch", "--workers", "0", "--device", "cpu", "--model", "tinynet", "--mix", "vanilla",
         "--output", out, "--log-interval", "1", "--no-visualize"]
result = {"help": build_parser()._subparsers._group_actions[0].choices["train"].format_help()}
with open(out + "/c.yaml", "w") as f:
    f.write("run: {fake_knob: 7}\n")
result["trained"] = main(train + ["--experiment", "a", "--fake-knob", "5"])
result["yaml"] = open(out + "/a/config.yaml").read()
result["stored"] = load_checkpoint(out + "/a/last.pt")["config"].get("fake_knob")
result["from_file"] = config.build_config(config.load_yaml(out + "/c.yaml")).run.fake_knob
result["bad"] = main(train + ["--experiment", "b", "--fake-knob", "0"])
result["resume_changed"] = main(["train", "--resume", "a", "--output", out, "--epochs", "2", "--fake-knob", "6"])
json.dump(result, sys.stdout)
"""


def test_a_field_added_to_a_section_is_a_flag_a_yaml_key_a_config_line_and_fixed_on_resume(tmp_path):
    from faultkit import make_folder

    data = make_folder(tmp_path / "data", train_per_class=4, val_per_class=2)
    (tmp_path / "out").mkdir()
    run = subprocess.run([sys.executable, "-c", FAKE_FIELD, str(data), str(tmp_path / "out")], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    help_text = " ".join(result["help"].split())
    assert "run: " in help_text and "--fake-knob FAKE_KNOB a knob only this test has (default: 3)" in help_text
    assert result["trained"] == 0 and result["stored"] == 5 and result["from_file"] == 7
    assert "fake_knob: 5\n" in result["yaml"] and result["yaml"].rstrip().endswith("fake_knob: 5")
    assert result["bad"] == 2 and "error: --fake-knob must be at least 1, got 0" in run.stderr
    assert result["resume_changed"] == 2 and "--fake-knob (5 -> 6) cannot change on resume" in run.stderr
