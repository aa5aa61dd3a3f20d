"""The MLP compression workflow of Diao, Han, Chen (rank-constrained ADMM, then k-means + Huffman or int8)
on the `image-mlp` task, against the table that motivates it (plain int8: 2.47x faster, 3.87x smaller,
PSNR 27.14 -> 21.77 dB).

Rows: the fp32 original; plain int8 (the paper's baseline row); k-means + Huffman; ADMM low-rank;
ADMM low-rank + k-means + Huffman; ADMM low-rank + int8. The ADMM runs in the data norm (penalty and
projection in the Sigma-norm of each layer's calibration inputs, ranks per layer from the output energy),
with the weight-norm ADMM at one rank for every layer beside it; a reference row trains the original for
as many epochs as the ADMM row does in all. Per row: PSNR of the whole reconstructed image
(each engine's own outputs: int8 as onnxruntime and TVM run it), the file size (.tfz for coded weights,
.onnx otherwise) and latency measured side by side in one run on x86 (torch eager, onnxruntime, TVM tuned
with --tune-trials per candidate, and OpenVINO in f32 and its default precision where the openvino extra is
installed) on batches of 4096 pixel coordinates. Each engine's ratio is against the original on that engine. The reconstructions are saved
side by side in one PNG.

    python benchmarks/mlp_workflow.py --tune-trials 48 --report mlp.json --image mlp.png
    python benchmarks/mlp_workflow.py --latency off          # PSNR and sizes only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

import tensorfold as tf
from tensorfold.runtime.evaluate import predict
from tensorfold.runtime.tasks import get_task, image_mlp
from tensorfold.targets.registry import host_cpu

BATCH = 4096  # pixel coordinates per inference call
ENGINES = {"torch": "torch", "onnxruntime": "ort", "tvm": "tvm", "openvino-fp32": "ov f32", "openvino": "ov"}


def pipelines(admm: str, admm_weights: str, reference_epochs: int) -> list[tuple[str, str | None, str | None]]:
    """(row, the row it starts from, pipeline): None is the original; the data-norm ADMM runs once and the
    rows after it code or quantize that one result. The reference row trains the original for as many
    epochs as the ADMM row trains in all, so that what extra training alone buys is in the table too."""
    return [
        ("fp32 original", None, None),
        (f"fp32 original + {reference_epochs} epochs (reference)", "fp32 original",
         f"finetune(epochs={reference_epochs}, lr=0.001, batch=4096, distill=false)"),
        ("int8 (plain)", "fp32 original", "int8"),
        ("k-means + Huffman", "fp32 original", "kmeans, huffman"),
        ("ADMM low-rank, weight norm", "fp32 original", admm_weights),
        ("ADMM low-rank, data norm", "fp32 original", admm),
        ("ADMM data norm + k-means + Huffman", "ADMM low-rank, data norm", "kmeans, huffman"),
        ("ADMM data norm + int8", "ADMM low-rank, data norm", "int8"),
    ]


def training_epochs(pipeline: str) -> int:
    """Epochs an admm_lowrank pipeline trains in all: iters x epochs_per_iter + its fine-tune's epochs
    (read with the pass's own parser and defaults)."""
    from tensorfold.passes import load_all, parse
    from tensorfold.passes.training.finetune import parse_options

    (name, given), = parse(pipeline)
    options = load_all()[name].resolve(given)
    return options["iters"] * options["epochs_per_iter"] + parse_options(options["finetune"])["epochs"]


def file_bytes(graph, work: str, name: str) -> tuple[int, str]:
    suffix = ".tfz" if graph.coding is not None else ".onnx"
    path = os.path.join(work, name.replace(" ", "_").replace("+", "") + suffix)
    graph.save(path)
    return os.path.getsize(path), suffix


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admm", default="admm_lowrank(energy=0.98, data=true, iters=10, epochs_per_iter=2, "
                                          "batch=4096, lr=0.001, rho=0.001, rho_growth=2, finetune=(epochs=120, "
                                          "lr=0.001, distill=false))",
                        help="the ADMM step of the workflow (data norm: ranks per layer from calibration data)")
    parser.add_argument("--admm-weights", default="admm_lowrank(ratio=2, iters=10, epochs_per_iter=2, batch=4096, "
                                                  "lr=0.001, rho=0.001, rho_growth=2, finetune=(epochs=120, lr=0.001, "
                                                  "distill=false))",
                        help="the same ADMM in the weight norm (one rank for every layer), for comparison")
    parser.add_argument("--latency", choices=("on", "off"), default="on")
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per TVM build (0: untuned)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--report", help="write the rows as JSON here")
    parser.add_argument("--image", default="mlp_workflow.png", help="the reconstructions side by side (PNG)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    task = get_task("image-mlp")
    graph = tf.capture(task.model(), torch.zeros(BATCH, task.input_shape[1]))
    x, y = task.test_data()
    work = tempfile.mkdtemp(prefix="tensorfold-mlp-workflow-")
    rows, candidates, images = [], {}, {}
    base_bytes = None
    for label, start, pipeline in pipelines(args.admm, args.admm_weights, training_epochs(args.admm)):
        started = time.perf_counter()
        if pipeline is None:
            compressed = graph
        else:
            compressed, _ = tf.compress(candidates[start], pipeline, calibration="image-mlp", train_data="image-mlp",
                                        progress=sys.stderr.isatty())
        seconds = time.perf_counter() - started
        outputs = predict(compressed, x)
        size, suffix = file_bytes(compressed, work, label)
        base_bytes = base_bytes or size
        row = {"row": label, "pipeline": f"{start}, then {pipeline}" if pipeline else "-", "psnr": task.evaluate(outputs, y)["psnr"],
               "bytes": size, "file": suffix, "smaller_x": base_bytes / size, "seconds": round(seconds, 1),
               "params": compressed.total_params()}
        rows.append(row)
        candidates[label] = compressed
        images[label] = image_mlp.as_image(outputs)
        print(f"  {label:36s} PSNR {row['psnr']:.2f} dB  {size / 1e6:.3f} MB ({suffix})  {seconds:.0f} s",
              file=sys.stderr)

    if args.latency == "on":
        measured = tf.measure(candidates, "x86", data=(x, y), evaluator=task.evaluate, tune_trials=args.tune_trials,
                              rounds=args.rounds, work_dir=os.path.join(work, "measure"),
                              progress=sys.stderr.isatty(), strict=False)
        by = {(r["candidate"], r["engine"]): r for r in measured.rows}
        for row in rows:
            for engine in ENGINES:
                mine, base = by.get((row["row"], engine), {}), by.get(("fp32 original", engine), {})
                if mine.get("latency") and base.get("latency"):
                    ms = mine["latency"]["median_ms"]
                    row[f"{engine}_ms"] = round(ms, 3)
                    row[f"{engine}_x"] = round(base["latency"]["median_ms"] / ms, 2)
                if "psnr" in mine.get("evaluator", {}):  # the engine's own outputs (int8 as it really runs)
                    row[f"{engine}_psnr"] = round(mine["evaluator"]["psnr"], 2)

    _save_image(images, rows, args.image)
    engines = [e for e in ENGINES if any(f"{e}_x" in row for row in rows)]
    head = ["row", "PSNR dB", "size", "smaller", *(f"{ENGINES[e]} x" for e in engines), "TVM PSNR"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        ratios = " | ".join(f"{row[f'{e}_x']:.2f} ({row[f'{e}_ms']:.2f} ms)" if f"{e}_x" in row else "-" for e in engines)
        print(f"| {row['row']} | {row['psnr']:.2f} | {row['bytes'] / 1e6:.3f} MB {row['file']} | "
              f"{row['smaller_x']:.2f}x | {ratios} | {row.get('tvm_psnr', float('nan')):.2f} |")
    print(f"\nCPU: {host_cpu()}; batch {BATCH} coordinates; TVM: {args.tune_trials} MetaSchedule trials per candidate "
          f"({'untuned' if not args.tune_trials else 'tuned'}); ADMM: {args.admm}")
    print(f"wrote {args.image}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"cpu": host_cpu(), "args": vars(args), "rows": rows}, f, indent=2, default=float)
        print(f"wrote {args.report}")


def _save_image(images: dict, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.4))
    for ax, row in zip(np.atleast_1d(axes), rows):
        ax.imshow(images[row["row"]], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{row['row']}\n{row['psnr']:.2f} dB, {row['bytes'] / 1e6:.2f} MB", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"image-mlp (camera 256x256) on {host_cpu()}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # room for the suptitle above the panels' titles
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
