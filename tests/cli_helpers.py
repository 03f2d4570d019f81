"""Running the sparsec command line in process from a test."""
from sparsec.cli import main


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of ``sparsec ARGS``, run in this process."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line that stderr must consist of."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
