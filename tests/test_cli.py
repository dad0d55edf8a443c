"""The `imagebeam` command: its help, its dispatch to each module's own main() (flags and
exit codes as under `python -m`), its installed entry point; and a trainer terminal that
shows our lines, not TensorFlow's C++ start-up lines."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGEBEAM = [sys.executable, "-m", "pipelines.cli"]  # the console script without PATH


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          **kwargs)


def test_help_lists_every_command_once_with_the_exit_codes():
    result = _run([*IMAGEBEAM, "--help"])
    assert result.returncode == 0, result.stderr
    commands = result.stdout.split("commands:\n")[1].split("\n\n")[0]
    assert [line.split()[0] for line in commands.splitlines()] == [
        "preprocess", "train", "run", "retrain", "predict", "deploy"]
    codes = result.stdout.split("exit status:\n")[1]
    assert re.findall(r"^  (\d+) ", codes, re.MULTILINE) == ["0", "1", "2", "130", "143"]


def test_help_and_dispatch_load_only_the_chosen_command():
    # TensorFlow and Beam take seconds to import: `--help` and an unknown command load
    # neither (a command loads only its own module).
    probe = ("import sys; from pipelines import cli; cli.main(['--help']); "
             "cli.main(['nope']); assert not {'tensorflow', 'apache_beam'} & set(sys.modules)")
    result = _run([sys.executable, "-c", probe])
    assert result.returncode == 0, result.stderr


def test_a_command_shows_its_own_help():
    result = _run([*IMAGEBEAM, "preprocess", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--image_size" in result.stdout and "--max_error_rate" in result.stdout


def test_an_unknown_command_is_one_line_and_exit_2():
    result = _run([*IMAGEBEAM, "preprocesss", "--input", "x"])
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "unknown command 'preprocesss'" in result.stderr


def test_no_command_is_a_usage_error():
    result = _run(IMAGEBEAM)
    assert result.returncode == 2 and "usage: imagebeam" in result.stderr


def test_a_bad_flag_fails_as_under_python_m(tmp_path):
    flags = ["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--no_such_flag"]
    ours = _run([*IMAGEBEAM, "preprocess", *flags])
    module = _run([sys.executable, "-m", "pipelines.preprocess", *flags])
    assert ours.returncode == module.returncode == 2
    assert ours.stderr == module.stderr and "--no_such_flag" in ours.stderr
    assert not (tmp_path / "out").exists()


def test_the_installed_console_script_is_the_dispatcher():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["imagebeam"].value == "pipelines.cli:main"


def test_the_trainer_terminal_shows_no_tensorflow_start_up_lines(photo_prep, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env["TMPDIR"] = str(tmp_path / "tmp")  # where the start-up log goes (and is removed)
    (tmp_path / "tmp").mkdir()
    result = _run([sys.executable, "-m", "trainer.task", "--data", str(photo_prep.output),
                   "--model_dir", str(tmp_path / "model"), "--epochs", "1", "--model",
                   "linear", "--batch_size", "16", "--progress", "off"], env=env)
    assert result.returncode == 0, result.stderr
    assert "[trainer] done: 1 epochs" in result.stderr
    assert not re.search(r"^[IWEF]\d{4} ", result.stderr, re.MULTILINE), result.stderr
    assert "absl::InitializeLog" not in result.stderr and "cuInit" not in result.stderr
    assert not list((tmp_path / "tmp").glob("imagebeam-trainer-*")), "start-up log left"
