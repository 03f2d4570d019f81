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


def without_progress(err: str) -> str:
    """stderr without the progress lines (``sparsec: ...``, :mod:`sparsec.progress`) that precede an error."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("sparsec: "))


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line that stderr must consist of, besides progress lines."""
    lines = without_progress(err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
