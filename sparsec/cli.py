"""The ``sparsec`` command line: a thin layer over :mod:`sparsec.api`.

Data goes to stdout (``--json`` gives one JSON document), logs to stderr. Exit codes: 0 success, 1 failure,
2 usage or pipeline syntax. No traceback unless ``--debug``. Importing this module does not import torch.
Long commands show progress on stderr (:mod:`sparsec.progress`): a line per finished step, bars on a terminal,
JSON lines with ``--json``, nothing with ``--quiet``.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import click

from sparsec.errors import SparsecError, UsageError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _progress(message: str) -> None:
    """A progress note on stderr, only on a terminal and when progress shows as lines."""
    from sparsec import progress

    if sys.stderr.isatty() and progress.mode() == "lines":
        click.echo(message, err=True)


def _progress_options(f):
    """``--quiet``, and progress on stderr while the command runs: lines, or JSON lines with ``--json``."""
    import functools

    @functools.wraps(f)
    def command(*args, quiet, **kwargs):
        from sparsec import progress

        progress.configure("off" if quiet else "json" if kwargs.get("as_json") else "lines")
        try:
            return f(*args, **kwargs)
        finally:
            progress.configure("auto")

    return click.option("--quiet", "-q", is_flag=True, help="no progress on stderr [default: a line per finished"
                        " step ('sparsec: capture (2.1 s)'), bars on a terminal; with --json, one JSON object per"
                        " progress event]")(command)


def _load_spec(spec: str | None, recipe: str | None, sets: tuple[str, ...]):
    from sparsec.pipeline import load_recipe, parse_text

    if (spec is None) == (recipe is None):
        raise UsageError("give exactly one of --pass SPEC and --recipe FILE, e.g. --pass relufy")
    pipeline = load_recipe(recipe) if recipe else parse_text(spec)
    return pipeline.with_overrides(sets)


def _model_options(f):
    f = click.option("--weights", metavar="FILE", help="state dict (.safetensors or .pt, loaded weights-only) for a"
                     " 'module:factory' MODEL")(f)
    f = click.option("--unsafe-pickle", is_flag=True, help="allow MODEL to be a whole-module pickle. DANGEROUS:"
                     " unpickling runs arbitrary code from the file; use only for files you made yourself")(f)
    f = click.option("--trust-remote-code", is_flag=True, help="allow a Hugging Face model to run its own Python"
                     " code (off by default)")(f)
    f = click.option("--static", is_flag=True, help="capture with fixed input shapes (no dynamic batch/sequence)")(f)
    f = click.option("--plugin", "plugins", multiple=True, metavar="FILE", help="Python file registering extra"
                     " passes (runs its code)")(f)
    return f


def _load_plugins(plugins) -> None:
    from sparsec.registry import load_plugin_file

    for p in plugins:
        load_plugin_file(p)


@click.group(context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="show full tracebacks on errors")
@click.version_option(package_name="sparsec", prog_name="sparsec")
@click.pass_context
def cli(ctx, debug):
    """sparsec: compile PyTorch models for activation sparsity.

    \b
    sparsec transform MODEL --pass relufy -o OUT/     rewrite a model, write an artifact
    sparsec trace MODEL                              what torch.export captured
    sparsec passes [NAME]                            the passes and their options
    sparsec pipeline show SPEC                       the canonical form of a pipeline
    sparsec inspect OUT/                             the report of an artifact
    sparsec eval OUT/ --ppl TEXTFILE                 perplexity beside the dense model (--embed: encoders)
    sparsec export OUT/ --to onnx -o model.onnx      export to ONNX (--verify: compare with torch)
    sparsec compile OUT/ -o BUILD/                   compile with TVM and sparsec's sparse kernels
    sparsec run model.onnx --inputs FILE             run with ONNX Runtime (BUILD/ with TVM, OUT/ with torch)
    sparsec generate OUT/ --prompt TEXT              generate text (OUT/ from 'transform --kv-cache', its .onnx
                                                     export or its TVM build)

    MODEL: a Hugging Face directory, a .pt2 file, a sparsec artifact, 'package.module:factory' (with --weights
    FILE for a state dict), or builtin:minilm / builtin:gemma3-270m (models that ship in packages).
    """
    ctx.obj = {"debug": debug}


@cli.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--pass", "-p", "spec", metavar="SPEC", help="pipeline, e.g. 'relufy' or 'relufy{to=fatrelu}'")
@click.option("--recipe", metavar="FILE", help="YAML recipe instead of --pass")
@click.option("--set", "sets", multiple=True, metavar="PASS.OPTION=VALUE", help="override an option (repeatable)")
@click.option("-o", "--output", "out", required=True, metavar="DIR", help="artifact directory to write")
@click.option("--force", is_flag=True, help="replace OUT if it is an existing artifact")
@click.option("--dump-ir", metavar="DIR", help="write the graph before and after every pass into DIR")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON document")
@click.option("--calib-data", metavar="FILE", help="calibration data for passes that need it: a .txt file (tokenised"
              " with the model's tokenizer) or a .pt/.npy tensor of token ids; default: Wikipedia text from gensim"
              " (articles 60 on) when the model has a tokenizer")
@click.option("--calib-samples", type=int, default=16, show_default=True, metavar="N",
              help="calibration sequences (windows of --seq-len tokens)")
@click.option("--seq-len", type=int, default=None, metavar="L", help="tokens per calibration sequence [default:"
              " 512, or the model's maximum]")
@click.option("--batch-size", type=int, default=4, show_default=True, metavar="B",
              help="calibration sequences per forward")
@click.option("--max-memory", metavar="SIZE", help="memory budget, e.g. 8GiB: a run whose estimate (parameters +"
              " peak activations of a calibration batch) exceeds it is refused before it starts [default: the memory"
              " available now]")
@click.option("--kv-cache", is_flag=True, help="capture a causal LM with a KV cache (prefill + one-token decode"
              " steps) so that the artifact, its ONNX export and its TVM build can 'sparsec generate'")
@click.option("--max-context", type=int, default=None, metavar="N", help="with --kv-cache: the longest context"
              " (prompt + generated tokens) [default: the model's maximum positions, at most 4096]")
@click.option("--strict", is_flag=True, help="fail (exit 1) when a pass changes nothing in the model [default: a"
              " warning line on stderr]")
@_model_options
@_progress_options
def transform(model, spec, recipe, sets, out, force, dump_ir, as_json, weights, unsafe_pickle, trust_remote_code,
              static, plugins, calib_data, calib_samples, seq_len, batch_size, max_memory, kv_cache, max_context,
              strict):
    """Rewrite MODEL with a pipeline of passes and write the artifact directory OUT."""
    from sparsec.resources import parse_memory

    budget = None if max_memory is None else parse_memory(max_memory)
    _load_plugins(plugins)
    pipeline = _load_spec(spec, recipe, sets)
    pipeline.validate_order()
    from sparsec.artifact import check_output_dir

    check_output_dir(out, force, inputs=[model, weights, recipe, calib_data])
    from sparsec import api
    from sparsec.instruments import DumpIR

    result = api.transform(model, pipeline, weights=weights, unsafe_pickle=unsafe_pickle,
                           trust_remote_code=trust_remote_code, dynamic=not static,
                           instruments=[DumpIR(dump_ir)] if dump_ir else [], calib_data=calib_data,
                           calib_samples=calib_samples, seq_len=seq_len, batch_size=batch_size,
                           max_memory=budget, kv_cache=kv_cache, max_context=max_context, strict=strict)
    api.save(result, out, force=force)
    summary = {"artifact": out, "pipeline": result.pipeline.canonical(),
               "passes": [{"name": p["name"], "stats": p["stats"], "seconds": p.get("seconds")}
                          for p in result.report["passes"]],
               "effect": {k: v for k, v in result.report.get("effect", {}).items() if k != "layers"}}
    if as_json:
        _echo_json(summary)
        return
    click.echo(f"wrote {out}")
    click.echo(f"pipeline: {summary['pipeline']}")
    for p in summary["passes"]:
        stats = ", ".join(f"{k}={v}" for k, v in p["stats"].items())
        click.echo(f"  {p['name']}: {stats} ({p['seconds']:.2f} s)")
    _print_effect(result.report.get("effect"))


def _print_effect(effect: dict | None) -> None:
    if not effect:
        return
    d, t, o = effect["dense"], effect["transformed"], effect.get("output", {})
    shapes = ", ".join(f"{k}{v}" for k, v in effect["inputs"].items())
    click.echo(f"measured on the example inputs ({shapes}):")
    click.echo(f"  MLP intermediate sparsity (zeros in the inputs of {t['mlp_layers']} MLP down-projections):"
               f" {d['mlp_intermediate_sparsity']:.1%} -> {t['mlp_intermediate_sparsity']:.1%}")
    click.echo(f"  linear-input sparsity (zeros in the inputs of all {t['weight_layers']} weight layers,"
               f" element-weighted): {d['linear_input_sparsity']:.1%} -> {t['linear_input_sparsity']:.1%}")
    if o:
        click.echo(f"  output vs dense: mean cosine {o['mean_cosine']:.4f}, max |diff| {o['max_abs_diff']:.3g}")


@cli.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON document")
@_model_options
def trace(model, as_json, weights, unsafe_pickle, trust_remote_code, static, plugins):
    """Capture MODEL with torch.export and report ops, inputs, linear layers and activations."""
    from sparsec import api

    info = api.trace(model, weights=weights, unsafe_pickle=unsafe_pickle, trust_remote_code=trust_remote_code,
                     dynamic=not static)
    if as_json:
        _echo_json(info)
        return
    click.echo(f"{info['model']} ({info['kind']}): {info['nodes']} nodes")
    click.echo("inputs:")
    for i in info["inputs"]:
        dims = ", ".join(str(d) if isinstance(d, int) else f"{d['symbol']}>={d['min']}" for d in i.get("shape", []))
        click.echo(f"  {i['name']}: {i.get('dtype', '')}[{dims}]")
    click.echo("ops (count):")
    for op, n in info["ops"].items():
        click.echo(f"  {n:6d}  {op}")
    click.echo(f"linear layers ({len(info['linears'])}):")
    for lin in info["linears"]:
        tag = "  [MLP intermediate input]" if lin["mlp_intermediate_input"] else ""
        click.echo(f"  {lin['module']}  {lin['op']} {lin['in_features']}->{lin['out_features']}{tag}")
    click.echo(f"activations ({len(info['activations'])}):")
    for act in info["activations"]:
        click.echo(f"  {act['module']}  {act['kind']}")


@cli.command(context_settings=CONTEXT)
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON document")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE", help="Python file registering extra passes")
def passes(name, as_json, plugins):
    """List the passes, or show one pass's options."""
    _load_plugins(plugins)
    from sparsec.registry import get_pass, list_passes

    if name is None:
        infos = list_passes()
        if as_json:
            _echo_json([p.to_json() for p in infos])
            return
        width = max(len(p.name) for p in infos)
        for p in infos:
            click.echo(f"{p.name:<{width}}  {p.summary}")
        return
    info = get_pass(name)
    data = info.to_json(detailed=True)
    if as_json:
        _echo_json(data)
        return
    click.echo(f"{info.name}: {data['description']}\n")
    calib = info.needs_calibration
    click.echo(f"needs calibration data: {f'with {calib}' if isinstance(calib, str) else 'yes' if calib else 'no'}")
    if info.after or info.before:
        click.echo(f"order: runs after {', '.join(info.after) or '-'}; before {', '.join(info.before) or '-'}")
    click.echo("options:")
    for o in data["options"]:
        extra = f"; {o['range']}" if "range" in o else ""
        click.echo(f"  {o['name']}: {o['type']} = {json.dumps(o['default'])}{extra}\n      {o['help']}")


@cli.group(context_settings=CONTEXT)
def pipeline():
    """Work with pipeline specs and recipes."""


@pipeline.command("show", context_settings=CONTEXT)
@click.argument("spec")
@click.option("--format", "fmt", type=click.Choice(["text", "yaml", "json"]), default="text", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="PASS.OPTION=VALUE", help="override an option (repeatable)")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE", help="Python file registering extra passes")
def pipeline_show(spec, fmt, sets, plugins):
    """Print the canonical form of SPEC (a text spec, or a .yaml/.yml recipe file) with every default."""
    _load_plugins(plugins)
    is_file = spec.endswith((".yaml", ".yml")) and os.path.exists(spec)
    pipe = _load_spec(None if is_file else spec, spec if is_file else None, sets)
    pipe.validate_order()
    click.echo({"text": pipe.canonical, "yaml": pipe.to_yaml, "json": pipe.to_json}[fmt]().rstrip("\n"))


@cli.command(context_settings=CONTEXT)
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON document")
@click.option("--plot", metavar="FILE.png", help="draw per-layer sparsity (target, calibration, held-out) as a chart")
@click.option("--force", is_flag=True, help="replace --plot FILE if it exists")
def inspect(artifact, as_json, plot, force):
    """Print the report of an artifact directory written by 'sparsec transform'."""
    from sparsec import api
    from sparsec.report import layer_table

    if plot:
        if not plot.lower().endswith(".png"):
            raise UsageError(f"--plot '{plot}' must end in .png")
        if os.path.lexists(plot) and not force:
            raise SparsecError(f"--plot file '{plot}' already exists; pass --force to replace it")
    art = api.load_artifact(artifact, load_program=False)
    report = art.report
    if plot:
        from sparsec.report import plot_layers

        plot_layers(report.get("layers", []), plot)
    if as_json:
        _echo_json({"manifest": art.manifest, **report})
        return
    m = art.manifest
    click.echo(f"artifact: {artifact}")
    click.echo(f"source:   {m.get('source', {}).get('model')} ({m.get('source', {}).get('kind')})")
    click.echo(f"pipeline: {m.get('pipeline')}")
    click.echo(f"versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()))
    for p in report.get("passes", []):
        stats = ", ".join(f"{k}={v}" for k, v in p.get("stats", {}).items() if not isinstance(v, (dict, list)))
        click.echo(f"pass {p['index'] + 1} {p['name']}: {stats}")
    lines = layer_table(report.get("layers", []))
    if lines:
        click.echo("")
        for line in lines:
            click.echo(line)
    sparsity = report.get("sparsity")
    if sparsity:
        click.echo(f"\nsparsity of the transformed model on held-out data ({sparsity['heldout_data']}):")
        for key, label in (("teal_param_weighted", "TEAL (parameter-weighted, thresholded linear inputs)"),
                           ("linear_input_element_weighted", "all weight-layer inputs, element-weighted"),
                           ("mlp_intermediate", "MLP intermediate (down-projection inputs)"),
                           ("weight_bytes_skipped", "weight bytes a sparse kernel skips")):
            if sparsity.get(key) is not None:
                click.echo(f"  {label}: {sparsity[key]:.1%}")
    if plot:
        click.echo(f"\nwrote {plot}")
    effect = report.get("effect")
    if effect:
        click.echo("")
        _print_effect(effect)


@cli.command("eval", context_settings=CONTEXT)
@click.argument("artifact")
@click.option("--ppl", metavar="TEXTFILE", help="causal LMs: perplexity of the transformed and the dense model")
@click.option("--embed", metavar="TEXTFILE", help="encoders: mean cosine similarity of transformed vs dense"
              " embeddings, one text per line")
@click.option("--seq-len", type=int, default=512, show_default=True, metavar="L", help="tokens per window (--ppl) or"
              " at most per line (--embed)")
@click.option("--samples", type=int, default=16, show_default=True, metavar="N", help="windows (--ppl) or lines"
              " (--embed)")
@click.option("--batch-size", type=int, default=4, show_default=True, metavar="B", help="sequences per forward")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON document")
@_progress_options
def eval_(artifact, ppl, embed, seq_len, samples, batch_size, as_json):
    """Evaluate the artifact ARTIFACT beside the dense model it was made from."""
    from sparsec.artifact import read_manifest

    read_manifest(artifact)  # not an artifact: fail before importing torch
    from sparsec.evaluate import evaluate

    _progress(f"sparsec: evaluating {artifact}")
    r = evaluate(artifact, ppl=ppl, embed=embed, seq_len=seq_len, samples=samples, batch_size=batch_size)
    if as_json:
        _echo_json(r)
        return
    if r["metric"] == "perplexity":
        click.echo(f"perplexity on {r['samples']} x {r['seq_len']} tokens of {r['text']}: transformed"
                   f" {r['transformed']:.3f}, dense {r['dense']:.3f}")
    else:
        click.echo(f"embeddings of {r['samples']} lines of {r['text']}: mean cosine transformed vs dense"
                   f" {r['mean_cosine']:.4f} (min {r['min_cosine']:.4f})")


@cli.command("export", context_settings=CONTEXT)
@click.argument("artifact")
@click.option("--to", "target", type=click.Choice(["onnx"]), required=True, help="what to export to")
@click.option("-o", "--output", "out", required=True, metavar="FILE", help="model file to write, e.g. model.onnx")
@click.option("--opset", type=int, metavar="N", help="ONNX opset version [default: the exporter's]")
@click.option("--external-data/--no-external-data", default=None, help="weights in FILE.data beside the model"
              " [default: when they exceed 1 GB]")
@click.option("--verify", is_flag=True, help="run ONNX Runtime and the torch artifact on sample inputs and compare;"
              " exit 1 beyond tolerance (unless, with ONNX Runtime's threshold decisions, every differing one is a"
              " tie and the outputs match)")
@click.option("--inputs", metavar="FILE", help="inputs for --verify: .npz or .safetensors, one array per model input"
              " [default: the artifact's example inputs, and the same cut to a shorter sequence]")
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="relative tolerance for --verify")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="absolute tolerance for --verify")
@click.option("--sparse-kernel", type=click.Choice(["none", "auto", "all", "gather"]), default="none",
              show_default=True, help="thresholded linears for batch-1 decode: auto = per layer the fastest as"
              " measured at batch 1 (sparsec's ONNX Runtime custom op, built with g++ on first use; the standard-op"
              " gather of active weight rows; dense), all = the custom op everywhere, gather = the standard-op"
              " gather everywhere, none = standard ops as exported")
@click.option("--quantized-matmul", type=click.Choice(["nbits", "standard"]), default="nbits", show_default=True,
              help="linears of the quantize pass: nbits = ONNX Runtime's com.microsoft.MatMulNBits on the packed"
              " weights (float32 compute; the session keeps them packed; 8 bits: ORT's CPU dequantizes the whole weight"
              " per call, slower than float32), standard = standard ONNX ops (ORT folds float32 weights at load)")
@click.option("--force", is_flag=True, help="replace FILE if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON document")
@_progress_options
def export(artifact, target, out, opset, external_data, verify, inputs, rtol, atol, sparse_kernel, quantized_matmul,
           force, as_json):
    """Export the artifact directory ARTIFACT to a deployable model (ONNX: dynamic batch/sequence axes)."""
    if inputs and not verify:
        raise UsageError("--inputs gives the inputs of --verify; add --verify")
    from sparsec import api
    from sparsec.artifact import read_manifest
    from sparsec.backends.onnxruntime.export import VerificationError, check_output_file

    check_output_file(out, force)
    read_manifest(artifact)  # not an artifact: fail before importing torch
    _progress(f"sparsec: exporting {artifact} to ONNX")
    failure = None
    try:
        result = api.export_onnx(artifact, out, opset=opset, verify=verify, inputs=inputs,
                                 external_data=external_data, force=force, rtol=rtol, atol=atol,
                                 sparse_kernel=sparse_kernel, quantized_matmul=quantized_matmul)
    except VerificationError as exc:
        result, failure = exc.result, exc
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        _echo_json(result.to_json())
    else:
        def sig(values):
            return ", ".join(f"{v['name']} {v['dtype']}[{', '.join(str(d) for d in v['shape'])}]" for v in values)

        data = f", weights in {result.files[0]}" if result.external_data else ""
        click.echo(f"wrote {out} (ONNX opset {result.opset}, {result.weight_bytes / 1e6:.1f} MB of weights{data},"
                   f" {result.seconds:.1f} s)")
        click.echo(f"inputs:  {sig(result.inputs)}")
        click.echo(f"outputs: {sig(result.outputs)}")
        if result.quantized_matmul:
            from sparsec.backends.onnxruntime import nbits

            click.echo(f"quantized matmul: {nbits.summary(result.quantized_matmul)}")
        if result.sparse_kernel:
            from sparsec.backends.onnxruntime.sparse import summary

            click.echo(f"sparse kernel: {summary(result.sparse_kernel)}")
        v = result.verification
        if v:
            click.echo(f"verify: ONNX Runtime vs torch (rtol {v['rtol']:g}, atol {v['atol']:g})")
            from sparsec.backends.onnxruntime.runtime import describe_run

            for r in v["runs"]:
                click.echo(f"  {describe_run(r)}")
    if failure is not None:
        raise SparsecError(failure.message)


@cli.command("compile", context_settings=CONTEXT)
@click.argument("artifact")
@click.option("--target", type=click.Choice(["llvm", "cuda", "aarch64"]), default="llvm", show_default=True,
              help="llvm: this machine's CPU (named exactly, e.g. znver4); cuda: NVIDIA sm_90 (H100/H200), the"
              " source checked with nvcc at build time, run where a GPU is; aarch64: any 64-bit ARM Linux CPU"
              " (Graviton, Ampere), cross-compiled here, run there")
@click.option("--threads", type=click.IntRange(min=1), metavar="N", help="TVM threads at run time [default: all CPUs]")
@click.option("--dense", is_flag=True, help="use sparsec's dense kernel in every linear layer (a baseline)")
@click.option("--tune-seconds", type=click.FloatRange(min=0), metavar="S",
              help="per kernel shape not in the tuning database (SPARSEC_TUNING_DB, default"
              " ~/.cache/sparsec/tuning.json), measure its schedules on this CPU for about S seconds and record the"
              " fastest; 0: the database's schedule, else the default [default: SPARSEC_TUNE_SECONDS, else 2]")
@click.option("-o", "--output", "out", required=True, metavar="DIR", help="build directory to write")
@click.option("--force", is_flag=True, help="replace DIR if it is an existing build")
@click.option("--json", "as_json", is_flag=True, help="print the build manifest as one JSON document")
@_progress_options
def compile_(artifact, target, threads, dense, tune_seconds, out, force, as_json):
    """Compile the artifact directory ARTIFACT with TVM and sparsec's sparse kernels into the build directory DIR."""
    from sparsec.artifact import check_output_dir, read_manifest
    from sparsec.backends.tvm.tuning import default_seconds

    read_manifest(artifact)  # not an artifact: fail before importing torch
    check_output_dir(out, force, inputs=[artifact])
    tune_seconds = default_seconds() if tune_seconds is None else tune_seconds
    from sparsec import api

    _progress(f"sparsec: compiling {artifact} for {target}")
    m = api.compile(artifact, out, target=target, threads=threads, sparse=not dense, force=force,
                    tune_seconds=tune_seconds)
    if as_json:
        _echo_json(m)
        return
    click.echo(f"wrote {out} (TVM {m['tvm']}, target {m['target']} cpu {m['cpu']}, {m['threads']} threads;"
               f" lowered in {m['seconds']['lower']:.1f} s, compiled in {m['seconds']['compile']:.1f} s)")
    kinds = {}
    for k in m["kernels"]:
        kinds[k.split("_")[2]] = kinds.get(k.split("_")[2], 0) + 1
    click.echo("kernels: " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))


@cli.command("run", context_settings=CONTEXT)
@click.argument("model")
@click.option("--inputs", metavar="FILE", help=".npz or .safetensors, one array per model input (by name)"
              " [required for .onnx; default for an artifact: its example inputs]")
@click.option("--output", "-o", "out", metavar="FILE.npz", help="write the outputs (by name) to this .npz file")
@click.option("--force", is_flag=True, help="replace --output FILE if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON document")
def run(model, inputs, out, force, as_json):
    """Run MODEL (a .onnx file with ONNX Runtime, a TVM build directory, or an artifact directory with torch) on
    --inputs FILE."""
    if out:
        if not out.endswith(".npz"):
            raise UsageError(f"--output '{out}' must end in .npz (the outputs are written as a numpy .npz file)")
        if os.path.lexists(out) and not force:
            raise SparsecError(f"output '{out}' already exists; pass --force to replace it, or choose another"
                               " --output")
    if not os.path.exists(model):
        raise SparsecError(f"model '{model}' does not exist; give a .onnx file or a sparsec artifact directory")
    from sparsec.backends.tvm.build import is_build_dir

    if os.path.isdir(model) and not is_build_dir(model):
        from sparsec.artifact import read_manifest

        read_manifest(model)
    import time

    from sparsec import api

    start = time.perf_counter()
    result = api.run(model, inputs)
    seconds = time.perf_counter() - start
    outputs = result["outputs"]
    if out:
        import tempfile

        import numpy as np

        parent = os.path.dirname(os.path.abspath(out))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp.npz", dir=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **outputs)
            os.replace(tmp, out)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    info = {"model": model, "backend": result["backend"], "inputs": inputs or "example inputs",
            "outputs": [{"name": k, "dtype": str(v.dtype), "shape": list(v.shape)} for k, v in outputs.items()],
            "output_file": out, "seconds": round(seconds, 3)}
    if as_json:
        _echo_json(info)
        return
    click.echo(f"ran {model} with {result['backend']} on {info['inputs']} ({seconds:.2f} s)")
    for o in info["outputs"]:
        click.echo(f"  {o['name']}: {o['dtype']}{o['shape']}")
    if out:
        click.echo(f"wrote {out}")


@cli.command("generate", context_settings=CONTEXT)
@click.argument("model")
@click.option("--prompt", metavar="TEXT", help="the prompt, tokenised with the model's tokenizer")
@click.option("--input-ids", metavar="FILE", help="the prompt as token ids: a .pt/.npy tensor or a text file of"
              " integers")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, metavar="N")
@click.option("--temperature", type=float, default=0.0, show_default=True, metavar="T",
              help="0: greedy; > 0: sample with this temperature")
@click.option("--top-k", type=int, default=0, show_default=True, metavar="K", help="sample from the K most likely"
              " tokens (0: all)")
@click.option("--top-p", type=float, default=1.0, show_default=True, metavar="P", help="sample from the smallest"
              " set of tokens whose probability reaches P")
@click.option("--seed", type=int, default=0, show_default=True, metavar="S", help="seed of the sampler")
@click.option("--ignore-eos", is_flag=True, help="always generate --max-new-tokens tokens")
@click.option("--tokenizer", metavar="DIR", help="tokenizer directory when MODEL keeps none")
@click.option("--threads", type=int, default=None, metavar="N", help="threads [default: all CPUs]")
@click.option("--stream", is_flag=True, help="print the text as it is generated")
@click.option("--json", "as_json", is_flag=True, help="print tokens, text and timings as one JSON document")
def generate(model, prompt, input_ids, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, tokenizer,
             threads, stream, as_json):
    """Generate text with MODEL: an artifact directory from 'transform --kv-cache' (torch), its .onnx export (ONNX
    Runtime) or its TVM build directory."""
    from sparsec.generation import check_options

    check_options(max_new_tokens, temperature, top_k, top_p)
    if (prompt is None) == (input_ids is None):
        raise UsageError("give exactly one of --prompt TEXT and --input-ids FILE")
    if not os.path.exists(model):
        raise SparsecError(f"model '{model}' does not exist; give an artifact directory, a .onnx file or a TVM build"
                           " directory")
    from sparsec.generation import open_stepper, run_generation

    stepper, info = open_stepper(model, threads=threads)
    tok = _tokenizer_for(model, tokenizer or info.get("tokenizer"), needed=prompt is not None)
    if prompt is not None:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = _read_token_ids(input_ids)
    printed = []

    def on_token(token: int) -> None:
        if stream and tok is not None and not as_json:
            printed.append(token)
            click.echo(tok.decode(printed[-1:]), nl=False)
            sys.stdout.flush()

    result = run_generation(stepper, ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            eos_token_id=info.get("eos_token_id"), ignore_eos=ignore_eos, on_token=on_token,
                            what=f"'{model}'")
    new = result.new_tokens.tolist()
    text = tok.decode(new, skip_special_tokens=True) if tok is not None else None
    summary = {"model": model, "backend": stepper.backend, "prompt_tokens": result.prompt_tokens,
               "tokens": new, "text": text, "stopped_by": result.stopped_by,
               "prefill_ms": round(result.prefill_ms, 3), "decode_ms_per_token": round(result.decode_ms_per_token, 3),
               "tokens_per_s": round(result.tokens_per_second, 2)}
    if as_json:
        _echo_json(summary)
        return
    if stream:
        click.echo()
    else:
        click.echo(text if text is not None else " ".join(map(str, new)))
    click.echo(f"{stepper.backend}: {len(new)} tokens, prefill {result.prefill_ms:.1f} ms"
               f" ({result.prompt_tokens} tokens), decode {result.decode_ms_per_token:.2f} ms/token"
               f" ({result.tokens_per_second:.1f} tokens/s), stopped by {result.stopped_by}", err=True)


def _tokenizer_for(model: str, tok_dir: str | None, *, needed: bool):
    """The Hugging Face tokenizer kept with MODEL (or --tokenizer DIR); None when there is none and none is
    needed (--input-ids: tokens are printed as ids)."""
    if not tok_dir:
        if needed:
            raise UsageError(f"'{model}' keeps no tokenizer, so --prompt cannot be tokenised: pass the prompt as token"
                             " ids with --input-ids FILE, or give --tokenizer DIR")
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as exc:
        raise SparsecError(f"cannot load the tokenizer in '{tok_dir}': {type(exc).__name__}: {exc}") from None


def _read_token_ids(path: str):
    """Token ids from a .pt/.npy tensor (weights-only) or a text file of whitespace-separated integers."""
    import torch

    if path.endswith((".pt", ".pth", ".npy")):
        from sparsec.calibration import load_token_file

        try:
            ids = load_token_file(path)
        except SparsecError as exc:
            raise type(exc)(exc.message.replace("calibration file", "--input-ids")) from None
    else:
        try:
            with open(path, encoding="utf-8") as f:
                ids = torch.tensor([int(t) for t in f.read().split()], dtype=torch.long)
        except OSError as exc:
            raise SparsecError(f"--input-ids '{path}' cannot be read: {exc.strerror}") from None
        except ValueError:
            raise UsageError(f"--input-ids '{path}' must hold whitespace-separated integer token ids") from None
    if ids.is_floating_point() or ids.numel() == 0:
        raise UsageError(f"--input-ids '{path}' must hold a non-empty sequence of integer token ids")
    return ids.reshape(1, -1).long()


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON document")
def env(as_json):
    """Print versions of sparsec and its dependencies, for bug reports."""
    import platform
    from importlib import metadata

    info = {"sparsec": metadata.version("sparsec"), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "apache-tvm", "numpy", "safetensors", "pyyaml",
                "click"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    if as_json:
        _echo_json(info)
        return
    for k, v in info.items():
        click.echo(f"{k:<14} {v if v is not None else 'not installed'}")


def main(argv=None) -> None:
    """Entry point: maps SparsecError to its exit code with a one-line message; --debug prints the traceback first."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="sparsec", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors from click itself, as one line like ours
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if isinstance(exc, click.UsageError) and ctx else ""
        click.echo(f"error: {exc.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(1)
    except SparsecError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"error: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback and"
                   " report it)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
