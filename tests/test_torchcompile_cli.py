"""--torchcompile through the real command: timm's optional-backend form (the bare flag is
inductor, `--no-torchcompile` turns a config file's off, a stored true/false still loads),
--torchcompile-scope step training AutoMix's whole loss step compiled (the per-step losses of
the eager run, at most one graph per kind of step, a resume that goes on compiled), what step
means for the baselines, and the one-line errors. The runs use the aot_eager backend, which
needs no C++ compiler."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from automix_fast.cli import build_parser, main
from automix_fast.config import build_config, config_changes, load_yaml, resumed_config
from automix_fast.engine.checkpoint import load_checkpoint
from automix_fast.errors import ConfigError
from automix_fast.mixing.automix import BACKBONE_STREAM
from automix_fast.mixing.base import StepRandom
from faultkit import make_folder, one_thread, train_args, train_losses  # noqa: F401
from test_config_sections import STORED

COMPILED = ("--torchcompile", "aot_eager", "--torchcompile-scope", "step")
# Seed 2 draws lam_bb 0.32, 0.93, 0.04, 0.36 at steps 0-3: with the Mix Block trained every
# other step and lam_margin 0.25, the first epoch (4 steps) has every kind of step.
AUTOMIX = ("--mix", "automix", "--seed", "2", "--mix-block-every", "2", "--lam-margin", "0.25")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("compile") / "data", train_per_class=8, val_per_class=2)


def graphs_compiled(argv, capsys):
    """(exit status, stdout, stderr, graphs dynamo compiled) of `automix-fast ARGV` in this process."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err, torch._dynamo.utils.counters["stats"]["unique_graphs"]


def one_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    return lines[0]


def test_torchcompile_takes_an_optional_backend_as_timm_and_a_stored_switch_still_reads(tmp_path):
    parse = build_parser().parse_args
    assert parse(["train", "--torchcompile"]).torchcompile == "inductor"
    assert parse(["train", "--torchcompile", "--epochs", "1"]).torchcompile == "inductor"
    assert parse(["train", "--torchcompile", "aot_eager"]).torchcompile == "aot_eager"
    assert parse(["train", "--no-torchcompile"]).torchcompile is False
    assert "torchcompile" not in vars(parse(["train"]))
    for word, value in (("false", False), ("off", False), ("No", False), ("true", "inductor"), ("on", "inductor")):
        flags = vars(parse(["train", "--torchcompile", word]))
        flags = {k: v for k, v in flags.items() if k not in ("command", "config")}
        assert build_config(overrides=flags).run.torchcompile == value, word
    cfg = build_config()
    assert (cfg.run.torchcompile, cfg.run.torchcompile_mode, cfg.run.torchcompile_scope) == (False, None, "encoders")
    # config files of the switch's days: true is timm's bare flag (inductor), false and null are off
    for text, value in (("true", "inductor"), ("false", False), ("null", False), ("aot_eager", "aot_eager")):
        (tmp_path / "c.yaml").write_text(f"torchcompile: {text}\n")
        assert build_config(load_yaml(str(tmp_path / "c.yaml"))).run.torchcompile == value, text
    (tmp_path / "c.yaml").write_text("torchcompile: 3\n")
    with pytest.raises(ConfigError, match=r"--torchcompile \(torchcompile in the config file\) must be false, "
                                          r"true or a name, got 3"):
        build_config(load_yaml(str(tmp_path / "c.yaml")))
    # a checkpoint whose config stores the switch on resumes compiled with inductor, no config change
    path = STORED / "last.pt"
    state = load_checkpoint(path)
    state["config"] = {**state["config"], "torchcompile": True}
    cfg = resumed_config((str(path), state), {"resume": str(path)})
    assert cfg.run.torchcompile == "inductor" and config_changes(state["config"], cfg) == []
    off = resumed_config((str(path), state), {"resume": str(path), "torchcompile": False})
    assert off.run.torchcompile is False


def test_a_bad_backend_or_a_mode_without_inductor_is_one_line_before_any_work(data, tmp_path, capsys):
    code = main(train_args(data, tmp_path, "bad", "--torchcompile", "inductr"))
    msg = one_error(code, capsys.readouterr().err)
    assert "--torchcompile: torch.compile has no backend 'inductr'" in msg and "inductor" in msg
    code = main(train_args(data, tmp_path, "bad", "--torchcompile", "aot_eager", "--torchcompile-mode", "max-autotune"))
    msg = one_error(code, capsys.readouterr().err)
    assert msg == ("error: --torchcompile-mode is a mode of the inductor backend (--torchcompile aot_eager takes "
                   "none), got 'max-autotune'")
    with pytest.raises(SystemExit) as exit_:
        main(train_args(data, tmp_path, "bad", "--torchcompile-scope", "all"))
    assert "--torchcompile-scope: invalid choice: 'all'" in one_error(exit_.value.code, capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()


def kinds_of_steps(steps) -> set:
    """The (trains the Mix Block, plain mixup) pairs of `steps` under AUTOMIX."""
    lams = {step: StepRandom(2, 0).beta(2.0, step, BACKBONE_STREAM) for step in steps}
    return {(step % 2 == 0, min(lam, 1 - lam) <= 0.25) for step, lam in lams.items()}


@pytest.mark.slow
def test_step_compiled_automix_trains_as_eager_in_one_graph_per_kind_of_step_and_resumes(
        data, tmp_path, capsys, one_thread, stand_in_compile_clock):
    assert len(kinds_of_steps(range(4))) == 4  # the first epoch already has every kind of step
    window = stand_in_compile_clock  # each compile window lasts this long (1.5 s): windows are counted, not timed

    code, out, err, graphs = graphs_compiled(train_args(data, tmp_path, "eager", *AUTOMIX, batch=6), capsys)
    assert code == 0, err
    # An eager run neither compiles nor reports compiling.
    assert graphs == 0 and "torch.compile" not in out and "compile_seconds" not in \
        json.loads((tmp_path / "eager" / "summary.json").read_text())
    eager = train_losses(tmp_path / "eager")
    assert len(eager) == 8

    code, out, err, graphs = graphs_compiled(train_args(data, tmp_path, "step", *AUTOMIX, *COMPILED, batch=6), capsys)
    assert code == 0, err
    note = [line for line in out.splitlines() if line.startswith("torch.compile (")]
    assert note == ["torch.compile (aot_eager): the whole loss step of --mix automix (2 graphs: with and without "
                    "the Mix Block branch); the first steps are slower while it compiles; leave out "
                    "--torchcompile (or pass --no-torchcompile) to run eager"]
    assert graphs == 2  # one per kind of step over 8 steps with all four (Mix Block, plain mixup) pairs
    # The warm-up is one line after the epoch that compiled (the first: every kind of step) and
    # none after the second; the summary has the seconds spent compiling: 1.5 s a window, the two
    # frames and (compiled at their first backward) their two backward graphs.
    lines = out.splitlines()
    warmup = [i for i, line in enumerate(lines) if line.startswith("torch.compile warm-up:")]
    assert len(warmup) == 1, out
    assert lines[warmup[0]] == ("torch.compile warm-up: 6.0 s compiling in this epoch (2 frames traced, "
                                "2 backward graphs compiled)")
    assert lines[warmup[0] - 2].startswith("epoch 1/2 done:") and lines[warmup[0] - 1].startswith("  eval ")
    summary = json.loads((tmp_path / "step" / "summary.json").read_text())
    assert summary["compile_seconds"] == 4 * window  # 4 windows: 2 frames, 2 backward graphs
    assert "epochs in " in out and "s (6.0s of it compiling)" in out
    stored = yaml.safe_load((tmp_path / "step" / "config.yaml").read_text())
    assert (stored["torchcompile"], stored["torchcompile_mode"], stored["torchcompile_scope"]) == \
        ("aot_eager", None, "step")
    compiled = train_losses(tmp_path / "step")
    # 1 - lam rounds in float32 in the compiled step: close to the eager run, not bit-identical
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)

    # Resumed from its epoch-1 checkpoint, the run goes on compiled (the stored flags) as it went.
    code, out, err, graphs = graphs_compiled(["train", "--resume", str(tmp_path / "step" / "checkpoint-0001.pt"),
                                              "--experiment", "resumed"], capsys)
    assert code == 0, err
    assert "forked from" in out and "at epoch 2, batch 0" in out
    assert "torch.compile (aot_eager): the whole loss step of --mix automix" in out
    assert graphs == len({mix_block for mix_block, _ in kinds_of_steps(range(4, 8))})
    resumed = train_losses(tmp_path / "resumed")
    assert resumed[-4:] == pytest.approx(compiled[4:], rel=1e-6, abs=1e-6)
    assert resumed[-4:] == pytest.approx(eager[4:], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_the_default_scope_compiles_the_encoders_and_step_a_baselines_model(data, tmp_path, capsys, one_thread):
    code, out, err, graphs = graphs_compiled(train_args(data, tmp_path, "encoders", "--torchcompile", "aot_eager",
                                                        batch=6, epochs=1), capsys)
    assert code == 0, err
    assert "torch.compile (aot_eager): the model and the momentum encoder; the first steps are slower" in out
    assert graphs >= 2  # q's forward and k's, each its own graph
    code, out, err, graphs = graphs_compiled(train_args(data, tmp_path, "mixup", "--mix", "mixup", *COMPILED, batch=6,
                                                        epochs=1), capsys)
    assert code == 0, err
    assert "torch.compile (aot_eager): the model (--mix mixup has no whole-step graph); the first steps are slower" \
        in out
    assert graphs >= 1
    eager = main(train_args(data, tmp_path, "eager", "--mix", "mixup", batch=6, epochs=1))
    assert eager == 0
    assert train_losses(tmp_path / "mixup") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-4, abs=1e-5)
