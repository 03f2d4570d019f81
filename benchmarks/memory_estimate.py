"""How close is the memory estimate of `transform --max-memory` to what a forward really takes?

For each model and (batch, seq) it prints the estimate of sparsec.resources (peak live activations computed from the
captured graph, attention weights included) next to the measured peak: in a fresh process, the peak RSS (VmHWM,
reset through /proc/self/clear_refs just before) of one no-grad forward of the artifact's module at that shape, less
the RSS before it. Models: the test
zoo's small Llama (hidden 64, 4 heads, vocab 256) and the real all-MiniLM-L6-v2 (builtin:minilm).
Usage: python benchmarks/memory_estimate.py [--markdown FILE]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

CONFIGS = {"zoo-llama": [(1, 256), (4, 512), (8, 1024)], "builtin:minilm": [(1, 128), (4, 256), (8, 512)]}

CHILD = r"""
import json, sys
import torch
torch.set_num_threads(1)
import sparsec
from sparsec.inputs import example_inputs
batch, seq = int(sys.argv[2]), int(sys.argv[3])
module = sparsec.load(sys.argv[1])
names = list(example_inputs(sparsec.load_artifact(sys.argv[1]).program))
ids = torch.randint(0, 200, (batch, seq))
feed = {n: (ids if n == "input_ids" else torch.ones_like(ids)) for n in names}
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
with torch.no_grad():
    module(**feed)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def make_artifact(name: str, out: str) -> None:
    import sparsec

    if name == "zoo-llama":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
        from tests.zoo import build

        model, inputs = build("llama")
        sparsec.save(sparsec.transform(model, "relufy", example_inputs=inputs, measure=False), out)
    else:
        sparsec.save(sparsec.transform(name, "relufy", measure=False), out)


def main():
    from sparsec.artifact import read_artifact
    from sparsec.resources import human_size, parameter_bytes, peak_activation_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    lines = ["| model | parameters | batch x seq | estimated peak activations | measured peak growth | measured /"
             " estimated |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, shapes in CONFIGS.items():
            art = os.path.join(tmp, name.replace(":", "-"))
            make_artifact(name, art)
            program = read_artifact(art).program
            params = parameter_bytes(program)
            for batch, seq in shapes:
                est = peak_activation_bytes(program, batch, seq)
                out = subprocess.run([sys.executable, "-c", CHILD, art, str(batch), str(seq)], check=True,
                                     capture_output=True, text=True).stdout
                got = json.loads(out.strip().splitlines()[-1])
                grown = got["peak"] - got["before"]
                line = (f"| {name} | {human_size(params)} | {batch} x {seq} | {human_size(est)} |"
                        f" {human_size(max(grown, 0))} | {grown / est:.2f} |")
                print(line, flush=True)
                lines.append(line)
    header = (f"Measured on {platform.node() or 'this machine'} ({os.cpu_count()} CPUs, shared with other jobs;"
              " memory is not timing-sensitive), one fresh process per row, torch threads 1; peak RSS reset with /proc/self/clear_refs before the forward.\n\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Memory estimate vs measured peak\n\n" + header + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
