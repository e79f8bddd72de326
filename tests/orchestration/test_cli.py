import subprocess
import sys

from privtune.cli import COMMANDS, main


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "privtune.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command.name in out.stdout


def test_models_command_describes_a_tiny_model(capsys):
    assert main(["models", "tiny-opt"]) == 0
    out = capsys.readouterr().out
    assert "family      opt" in out and "blocks      6" in out


def test_user_errors_exit_2_without_traceback(capsys, tmp_path):
    assert main(["models", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
