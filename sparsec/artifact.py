"""The artifact directory: model.pt2 + recipe.yaml + manifest.json + report.json, written atomically.

Never a pickle: the program is saved with ``torch.export.save``; the manifest records the format version, versions
of the tools, the canonical pipeline, the input spec, a fingerprint and a sha256 per file, checked on every read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

from sparsec.errors import SparsecError, first_line

FORMAT = "sparsec-artifact"
FORMAT_VERSION = 1
MODEL_FILE, RECIPE_FILE, MANIFEST_FILE, REPORT_FILE = "model.pt2", "recipe.yaml", "manifest.json", "report.json"
TOKENIZER_DIR = "tokenizer"
#: the files of a Hugging Face tokenizer that an artifact keeps (so ``sparsec generate --prompt`` needs no source)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
_TMP_MARK = ".sparsec-tmp-"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    import platform

    import torch

    import sparsec

    versions = {"sparsec": sparsec.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return versions


def input_spec(program) -> list[dict]:
    """Name, dtype and shape of each user input; symbolic dims appear as their symbol with its range."""
    import torch

    user = set(program.graph_signature.user_inputs)
    ranges = {str(k): v for k, v in program.range_constraints.items()}
    spec = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            spec.append({"name": node.name, "value": repr(val)})
            continue
        dims = []
        for d in val.shape:
            if isinstance(d, int):
                dims.append(d)
            else:
                r = ranges.get(str(d))
                hi = None if r is None or not str(r.upper).isdigit() else int(r.upper)
                dims.append({"symbol": str(d), "min": int(r.lower) if r is not None else None, "max": hi})
        spec.append({"name": node.name, "dtype": str(val.dtype).removeprefix("torch."), "shape": dims})
    return spec


def cleanup_stale_temporaries(parent: str) -> None:
    """Remove temporaries of earlier runs that were killed (their process no longer exists)."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for name in entries:
        if _TMP_MARK not in name:
            continue
        pid = name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_dir(out_dir: str, force: bool, inputs: list[str] = ()) -> None:
    """Refuse an existing OUT without --force, and any OUT that is or contains one of the inputs."""
    out = os.path.abspath(out_dir)
    for src in inputs:
        if src and os.path.exists(src):
            s = os.path.abspath(src)
            if s == out or s.startswith(out + os.sep) or out.startswith(s + os.sep) and os.path.isfile(s):
                raise SparsecError(f"output '{out_dir}' would overwrite the input '{src}'; choose another -o")
    if os.path.lexists(out_dir):
        if not force:
            raise SparsecError(f"output '{out_dir}' already exists; pass --force to replace it, or choose another -o")
        if not os.path.isdir(out_dir) or not os.path.isfile(os.path.join(out_dir, MANIFEST_FILE)):
            raise SparsecError(f"output '{out_dir}' exists and is not a sparsec artifact; --force replaces only"
                               " artifacts: remove it yourself or choose another -o")


def copy_tokenizer(source_dir: str | None, dest_dir: str) -> list[str]:
    """Copy the tokenizer files of ``source_dir`` (:data:`TOKENIZER_FILES`) into ``dest_dir``; their names."""
    names = [f for f in TOKENIZER_FILES if source_dir and os.path.isfile(os.path.join(source_dir, f))]
    if names:
        os.makedirs(dest_dir, exist_ok=True)
        for name in names:
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(dest_dir, name))
    return names


def write_artifact(out_dir: str, program, recipe_yaml: str, manifest: dict, report: dict, *,
                   force: bool = False, tokenizer_dir: str | None = None) -> str:
    """Write the artifact into a temporary sibling directory and rename it into place at the end; the tokenizer
    files of ``tokenizer_dir`` are kept in its ``tokenizer/`` folder."""
    import torch

    check_output_dir(out_dir, force)
    with atomic_directory(out_dir) as tmp:
        with warnings.catch_warnings():  # torch warns of storages shared by empty tensors (a cached program's
            warnings.filterwarnings("ignore", "No complete tensor found")  # empty pasts): nothing to save there
            torch.export.save(program, os.path.join(tmp, MODEL_FILE))
        _write_text(os.path.join(tmp, RECIPE_FILE), recipe_yaml)
        _write_text(os.path.join(tmp, REPORT_FILE), json.dumps(report, indent=2, default=_json_default))
        names = [MODEL_FILE, RECIPE_FILE, REPORT_FILE]
        names += [f"{TOKENIZER_DIR}/{f}" for f in copy_tokenizer(tokenizer_dir, os.path.join(tmp, TOKENIZER_DIR))]
        files = {f: sha256_file(os.path.join(tmp, f)) for f in names}
        fingerprint = hashlib.sha256(json.dumps([manifest.get("pipeline"), files[MODEL_FILE]]).encode()).hexdigest()
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "fingerprint": fingerprint,
                "files": files}
        _write_text(os.path.join(tmp, MANIFEST_FILE), json.dumps(full, indent=2, default=_json_default))
    return out_dir


@contextlib.contextmanager
def atomic_directory(out_dir: str):
    """Yield a new temporary sibling of ``out_dir`` to fill. When the block ends without an error the temporary
    takes ``out_dir``'s place (an existing ``out_dir``, which the caller has allowed, is swapped out in one atomic
    step where the system can and then removed); on an error, or if the process is killed, ``out_dir`` is untouched
    and the temporary is removed (by :func:`cleanup_stale_temporaries` on the next run, if killed)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    cleanup_stale_temporaries(parent)
    base = os.path.basename(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=f".{base}{_TMP_MARK}", dir=parent, suffix=f"-{os.getpid()}")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output gets the mode of a plain mkdir
        yield tmp
        _fsync_dir(tmp)
        if os.path.lexists(out_dir):  # --force: swap the old output out only once the new one is complete
            if exchange_paths(tmp, out_dir):  # one atomic step: OUT is always the old or the new output
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = tempfile.mkdtemp(prefix=f".{base}{_TMP_MARK}old-", dir=parent, suffix=f"-{os.getpid()}")
                os.rename(out_dir, os.path.join(old, base))
                os.rename(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def exchange_paths(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system or
    file system cannot, and the caller falls back to two renames."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(obj: Any):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


@dataclass
class Artifact:
    path: str
    manifest: dict
    report: dict
    recipe_yaml: str
    program: Any = None

    def module(self):
        """The program as a runnable, trainable module (see :func:`sparsec.calling.calling_module`)."""
        from sparsec.calling import calling_module

        return calling_module(self.program, self.manifest.get("output_names"))


class _OneOf:
    """A schema that accepts a value matching any of ``alternatives``."""

    def __init__(self, *alternatives):
        self.alternatives = alternatives


_NUMBER = _OneOf(int, float)
_DIM = _OneOf(int, {"symbol": _OneOf(str, None), "min": _OneOf(int, None), "max": _OneOf(int, None)})
#: the fields sparsec reads from a manifest / report, with their types: a list schema holds its items' schema, a dict
#: schema the schema of each key ("key?" when it may be left out; other keys are allowed), {str: S} a mapping of
#: anything to S, and {} an empty mapping.
MANIFEST_SCHEMA = {
    "pipeline": str, "fingerprint": str, "versions?": dict, "source?": {"model?": str, "kind?": str},
    "inputs?": [_OneOf({"name": str, "dtype": str, "shape": [_DIM]}, {"name": str, "value": str})],
    "output_names?": [str], "files": {MODEL_FILE: str, RECIPE_FILE: str, REPORT_FILE: str},
    "generation?": {"eos_token_id": _OneOf(int, [int], None), "max_context": _OneOf(int, None)},
}
_STATS = {"mlp_intermediate_sparsity": _NUMBER, "linear_input_sparsity": _NUMBER, "mlp_layers": int,
          "weight_layers": int}
_FRACTION = _OneOf(_NUMBER, None)
REPORT_SCHEMA = {
    "passes?": [{"name": str, "index": int, "stats?": dict}], "layers?": [dict],
    "effect?": _OneOf(None, {"inputs": {str: [int]}, "dense": _STATS, "transformed": _STATS,
                             "output?": _OneOf({}, {"mean_cosine": _NUMBER, "max_abs_diff": _NUMBER})}),
    "sparsity?": _OneOf(None, {}, {"heldout_data": str, "teal_param_weighted?": _FRACTION,
                                   "linear_input_element_weighted?": _FRACTION, "mlp_intermediate?": _FRACTION,
                                   "weight_bytes_skipped?": _FRACTION}),
}


def schema_mismatch(value: Any, schema: Any, where: str = "") -> str | None:
    """The path of the first place where ``value`` does not fit ``schema`` (None when it fits)."""
    if isinstance(schema, _OneOf):
        misses = [schema_mismatch(value, alt, where) for alt in schema.alternatives]
        return None if None in misses else min(misses, key=len)
    if schema is None:
        return None if value is None else where or "(top level)"
    if isinstance(schema, type):
        fits = isinstance(value, schema) and not (isinstance(value, bool) and schema is not bool)
        return None if fits else where or "(top level)"
    if isinstance(schema, list):
        if not isinstance(value, list):
            return where or "(top level)"
        return next((m for i, v in enumerate(value) if (m := schema_mismatch(v, schema[0], f"{where}[{i}]"))), None)
    if not isinstance(value, dict) or not schema and value:  # the schema {} takes only an empty mapping
        return where or "(top level)"
    if len(schema) == 1 and next(iter(schema)) is str:  # {str: item}: any keys, each value an item
        item = schema[str]
        return next((m for k, v in value.items() if (m := schema_mismatch(v, item, f"{where}.{k}"))), None)
    for key, sub in schema.items():
        name = key.rstrip("?")
        if name not in value:
            if key.endswith("?"):
                continue
            return f"{where}.{name}"
        if (m := schema_mismatch(value[name], sub, f"{where}.{name}")):
            return m
    return None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        cause = "nested too deeply" if isinstance(exc, RecursionError) else first_line(exc)
        raise SparsecError(f"'{path}' is not valid JSON ({cause}); the artifact is damaged: re-create it") from None


def read_manifest(path: str) -> dict:
    """The manifest of the artifact directory ``path``, its format, version and fields checked (not the files)."""
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.isdir(path):
        raise SparsecError(f"'{path}' is not a sparsec artifact directory (it does not exist or is not a directory)")
    if not os.path.isfile(mpath):
        raise SparsecError(f"'{path}' is not a sparsec artifact: it has no {MANIFEST_FILE}; create one with"
                           " 'sparsec transform MODEL --pass SPEC -o DIR'")
    manifest = _read_json(mpath)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SparsecError(f"'{mpath}' is not a sparsec manifest (format must be '{FORMAT}')")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise SparsecError(f"'{path}' has artifact format version {version!r}; this sparsec reads version"
                           f" {FORMAT_VERSION}: re-create it with this sparsec or use the version that made it")
    files = manifest.get("files")
    extra = set(files) - {MODEL_FILE, RECIPE_FILE, REPORT_FILE} if isinstance(files, dict) else set()
    if (not isinstance(files, dict) or len(files) - len(extra) != 3
            or any(f not in {f"{TOKENIZER_DIR}/{t}" for t in TOKENIZER_FILES} for f in extra)):
        raise SparsecError(f"'{mpath}' lists no valid 'files' checksums; the artifact is damaged: re-create it")
    bad = schema_mismatch(manifest, MANIFEST_SCHEMA)
    if bad:
        raise SparsecError(f"'{mpath}': field '{bad.lstrip('.')}' is missing or of the wrong type; the artifact is"
                           " damaged: re-create it")
    return manifest


def read_artifact(path: str, *, load_program: bool = True) -> Artifact:
    """Read and verify an artifact: manifest format and version, then every file's sha256."""
    manifest = read_manifest(path)
    for name, digest in manifest["files"].items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise SparsecError(f"artifact '{path}' is missing {name}; re-create it")
        if sha256_file(fpath) != digest:
            raise SparsecError(f"artifact '{path}': {name} does not match its checksum in {MANIFEST_FILE} (modified"
                               " or damaged); re-create the artifact")
    report = _read_json(os.path.join(path, REPORT_FILE))
    bad = schema_mismatch(report, REPORT_SCHEMA)
    if bad:
        raise SparsecError(f"artifact '{path}': {REPORT_FILE} field '{bad.lstrip('.')}' is missing or of the wrong"
                           " type; re-create the artifact")
    try:
        with open(os.path.join(path, RECIPE_FILE), encoding="utf-8") as f:
            recipe = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SparsecError(f"artifact '{path}': {RECIPE_FILE} cannot be read ({first_line(exc)}); re-create the"
                           " artifact") from None
    art = Artifact(path, manifest, report, recipe)
    if load_program:
        import torch

        import sparsec.ops  # noqa: F401  registers the sparsec:: custom ops the program may contain
        try:
            art.program = torch.export.load(os.path.join(path, MODEL_FILE))
        except Exception as exc:
            raise SparsecError(f"artifact '{path}': {MODEL_FILE} cannot be loaded: {type(exc).__name__}: {exc}"
                               ) from None
    return art
