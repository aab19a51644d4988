"""Bad input everywhere: each mistake is exit status 2 and one line 'error: ...' naming the field,
never a traceback. Runs `automix_fast.cli.main` in this process (one CPU thread)."""
from __future__ import annotations

import pytest
import torch

from automix_fast.cli import main
from faultkit import make_folder, train_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("bad") / "data")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 1-epoch vanilla run to resume from: (output folder, experiment name)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("runs")
        assert main(train_args(data, out, "done", "--mix", "vanilla", epochs=1)) == 0
    finally:
        torch.set_num_threads(threads)
    return out, "done"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_error(capsys, argv) -> str:
    """Run the CLI, which must fail with status 2 and print exactly one 'error:' line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit for unparsable flag values
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


FLAG_CASES = [
    (["--mix-alpha", "0"], "--mix-alpha"),
    (["--mix-alpha", "-1"], "--mix-alpha"),
    (["--encoder-momentum", "0"], "--encoder-momentum"),
    (["--encoder-momentum", "1"], "--encoder-momentum"),
    (["--encoder-momentum-end", "1.5"], "--encoder-momentum-end"),
    (["--mask-margin", "-0.1"], "--mask-margin"),
    (["--mix", "mixup", "-b", "1"], "--batch-size"),
    (["-b", "0", "--mix", "vanilla"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--momentum", "1"], "--momentum"),
    (["--lam-margin", "0.5"], "--lam-margin"),
    (["--max-bad-steps", "0"], "--max-bad-steps"),
    (["--num-classes", "1"], "--num-classes"),
    (["--img-size", "4"], "--img-size"),
    (["--lr", "fast"], "--lr"),  # wrong type on the command line
    (["--mix", "mixdown"], "--mix"),
    (["--sched", "step"], "--decay-epochs is needed with --sched step"),
    (["--sched", "multistep"], "--decay-milestones is needed with --sched multistep"),
    (["--sched", "step", "--decay-epochs", "0"], "--decay-epochs must be a positive number of epochs"),
    (["--sched", "step", "--decay-epochs", "30", "60"], "unrecognized arguments: 60"),  # a period, not a list
    (["--sched", "multistep", "--decay-milestones", "2", "-1"], "--decay-milestones must be positive epochs"),
    (["--sched", "multistep", "--decay-milestones", "1.5"], "--decay-milestones"),
    (["--decay-rate", "0"], "--decay-rate must be in (0, 1]"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number, got inf"),
    (["--warmup-lr", "-1"], "--warmup-lr must be 0 or more, got -1.0"),
    (["--warmup-lr", "nan"], "--warmup-lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--clip-grad", "inf"], "--clip-grad must be a finite number, got inf"),
    (["--mix-block-lr", "0.01", "--mix-block-min-lr", "0.5"],
     "--mix-block-min-lr must be at most the Mix Block's learning rate 0.01, got 0.5"),
    (["--min-lr", "0.03", "--mix-block-lr", "0.01"],
     "--mix-block-min-lr must be at most the Mix Block's learning rate 0.01 (unset: --min-lr), got 0.03"),
    (["--resume", "auto"], "--experiment"),
]


@pytest.mark.parametrize("flags,field", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_bad_flag_values(capsys, tmp_path, flags, field):
    # A tiny model for one epoch before the flags under test (the later value wins): a value that
    # stops being refused then fails this test in seconds instead of training the default run.
    argv = ["train", "--output", str(tmp_path), "--device", "cpu", "--kernel-backend", "torch", "--model", "tinynet",
            "--epochs", "1", *flags]
    assert field in one_error(capsys, argv)


@pytest.mark.parametrize("text,field", [
    ("lr: 0.1\nlearning_rate: 0.1\n", "unknown config key 'learning_rate'"),
    ("lr: fast\n", "--lr (lr in the config file) must be a number"),
    ("epochs: 2.5\n", "--epochs (epochs in the config file) must be an integer"),
    ("sync_bn: 'yes'\n", "--sync-bn (sync_bn in the config file) must be true or false"),
    ("mix_alpha: 0\n", "--mix-alpha (mix_alpha in the config file)"),
    ("sched: multistep\ndecay_milestones: ['1']\n",
     "--decay-milestones (decay_milestones in the config file) must be a list of integers, got ['1']"),
    ("sched: step\ndecay_epochs: ['1']\n", "(decay_milestones in the config file) must be a list of integers"),
    ("lr: .inf\n", "--lr (lr in the config file) must be a finite number, got inf"),
    ("- lr\n", "mapping"),
    ("lr: [\n", "not valid YAML"),
])
def test_bad_config_files(capsys, tmp_path, text, field):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert field in one_error(capsys, ["train", "-c", str(cfg), "--output", str(tmp_path)])


@pytest.mark.parametrize("content,field", [
    ("lr: 0.1\n".encode("utf-16"), "is not UTF-8 text"),  # Windows Notepad's "Unicode"
    ("experiment: café\n".encode("latin-1"), "is not UTF-8 text"),
    (b"lr: 0.1\nepochs: 3\nlr: 0.2\n", "key 'lr' is given twice (lines 1 and 3)"),
    (b"optim:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' is given twice (lines 2 and 3)"),
])
def test_config_files_that_yaml_reads_loosely(capsys, tmp_path, content, field):
    """Not UTF-8 (PyYAML would raise UnicodeDecodeError), or a key given twice (PyYAML keeps the
    last without a word): one line each. A missing data folder stops a file that is read anyway."""
    cfg = tmp_path / "odd.yaml"
    cfg.write_bytes(content)
    message = one_error(capsys, ["train", "-c", str(cfg), "--output", str(tmp_path), "--model", "tinynet",
                                 "--epochs", "1", "--device", "cpu", "--data-dir", str(tmp_path / "none")])
    assert field in message and str(cfg) in message, message


def test_a_config_folder_is_named_as_a_folder(capsys, tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "mine.yaml").write_text("lr: 0.1\n")
    for given in (f"{folder}/", str(folder)):
        message = one_error(capsys, ["train", "-c", given, "--output", str(tmp_path)])
        assert f"config file {given} is a folder, not a YAML file" in message and "mine.yaml" in message, message


@pytest.mark.parametrize("name", ["../escaped", "runs/a", "..", ".", "a\\b", "/abs/escaped"])
def test_experiment_is_a_plain_name_under_output(capsys, data, tmp_path, name):
    """--experiment names the run folder under --output: a path would write outside it."""
    out = tmp_path / "out"
    name = str(tmp_path / "escaped") if name.startswith("/") else name
    message = one_error(capsys, train_args(data, out, name, epochs=1))
    assert "--experiment must be a plain folder name" in message and repr(name) in message, message
    config = tmp_path / "run.yaml"
    config.write_text(f"experiment: '{name}'\n")
    message = one_error(capsys, ["train", "-c", str(config), "--output", str(out)])
    assert "--experiment (experiment in the config file) must be a plain folder name" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing made, inside or outside --output


def test_class_count_that_does_not_match_the_data(capsys, data, tmp_path):
    msg = one_error(capsys, train_args(data, tmp_path, "nc", "--num-classes", "5", epochs=1))
    assert "--num-classes is 5 but the data has 3 classes" in msg


def test_resume_with_changed_config_refuses_unless_asked(capsys, data, trained):
    out, name = trained
    msg = one_error(capsys, train_args(data, out, name, "--mix", "vanilla", "--lr", "0.2", "--resume", "auto", epochs=1))
    assert "--lr (0.05 -> 0.2) cannot change on resume" in msg and "--allow-config-change" in msg
    # Asked for: the change is accepted; the run is finished, so it says so and trains nothing.
    argv = train_args(data, out, name, "--mix", "vanilla", "--lr", "0.2", "--resume", "auto", "--allow-config-change",
                      epochs=1)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "is finished (1 of 1 epochs trained)" in captured.out and "cannot change" not in captured.err


def test_checkpoint_of_another_model(capsys, data, trained):
    out, name = trained
    # --lam-margin is read only by AutoMix: its warning waits for the first step, which never comes
    msg = one_error(capsys, train_args(data, out, "other", "--mix", "vanilla", "--model", "resnet18_cifar",
                                       "--lam-margin", "0.1", "--resume", str(out / name / "last.pt"), epochs=1))
    assert "--model ('tinynet' -> 'resnet18_cifar'), --lam-margin (0.08 -> 0.1) cannot change on resume" in msg
    # Forced (with an epoch left to train): the checkpoint still cannot load into another
    # network, said in one line.
    msg = one_error(capsys, train_args(data, out, "other", "--mix", "vanilla", "--model", "resnet18_cifar",
                                       "--lam-margin", "0.1", "--resume", str(out / name / "last.pt"),
                                       "--allow-config-change", epochs=2))
    assert "model 'tinynet'" in msg and "model 'resnet18_cifar'" in msg


def test_resume_from_a_file_that_is_not_a_checkpoint(capsys, data, tmp_path):
    junk = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, junk)
    msg = one_error(capsys, train_args(data, tmp_path, "junk", "--resume", str(junk), epochs=1))
    assert "not an automix-fast checkpoint" in msg
    (tmp_path / "empty.pt").write_bytes(b"")
    msg = one_error(capsys, train_args(data, tmp_path, "empty", "--resume", str(tmp_path / "empty.pt"), epochs=1))
    assert "the file is empty (0 bytes)" in msg
    msg = one_error(capsys, train_args(data, tmp_path, "gone", "--resume", str(tmp_path / "missing.pt"), epochs=1))
    assert "file not found" in msg


def test_unknown_model_and_missing_data(capsys, tmp_path):
    assert "unknown model 'resnet9000'" in one_error(capsys, ["train", "--model", "resnet9000", "--output", str(tmp_path)])
    assert "data directory not found" in one_error(
        capsys, ["train", "--data-dir", str(tmp_path / "nope"), "--device", "cpu", "--output", str(tmp_path)])
