"""The `tensorfold` command: compress, passes (build, measure, targets come with the TVM work)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from tensorfold.ir.errors import TensorfoldError


def _compress(args: argparse.Namespace) -> int:
    import tensorfold as tf
    from tensorfold.models import EXAMPLES, parse_shape, resolve

    out = os.path.abspath(args.output)
    if os.path.isfile(args.model) and os.path.exists(out) and os.path.samefile(args.model, out):
        raise TensorfoldError(f"refusing to write over the input file {args.model!r}; choose another -o")
    graph = resolve(args.model, parse_shape(args.input_shape), args.weights)
    evaluate = args.eval or ("digits" if args.model in EXAMPLES or args.model == EXAMPLES["digits"] else None)
    compressed, report = tf.compress(graph, args.passes, progress=not args.quiet)
    if evaluate == "digits":
        _add_digits_accuracy(report, graph, compressed)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    compressed.save(out)
    print(report.table())
    print(f"wrote {out}")
    if args.report:
        report.save(args.report)
        print(f"wrote {args.report}")
    return 0


def _add_digits_accuracy(report, original, compressed) -> None:
    from tensorfold.examples import digits
    from tensorfold.runtime.evaluate import classification_accuracy

    images, labels = digits.test_data()
    before = classification_accuracy(original, images, labels)
    after = classification_accuracy(compressed, images, labels)
    report.extra["test accuracy before"] = round(before, 4)
    report.extra["test accuracy after"] = round(after, 4)
    report.extra["test images"] = int(len(labels))


def _passes(args: argparse.Namespace) -> int:
    from tensorfold.passes import load_all

    for name, info in sorted(load_all().items()):
        print(f"{name}: {info.doc.splitlines()[0] if info.doc else ''}")
        for key, option in info.options.items():
            print(f"    {key}=<{option.type.__name__}> (default {option.default!r}): {option.help}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorfold", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    compress = sub.add_parser("compress", help="run a pass pipeline on a model and write the result")
    compress.add_argument("model", help="an .onnx file, torchvision:<arch>, package.module:function, or 'digits'")
    compress.add_argument("-p", "--passes", required=True, help='pipeline, e.g. "fold_bn, svd(rank=8)"')
    compress.add_argument("-o", "--output", required=True, help="output file: .onnx (any model), .pt2 or .pt (torch)")
    compress.add_argument("--input-shape", help="input shape, e.g. 1,3,224,224 (torch models; ONNX with free dims)")
    compress.add_argument("--weights", help="a state-dict file for a torchvision/factory model")
    compress.add_argument("--report", help="write the JSON report here")
    compress.add_argument("--eval", choices=["digits"], help="also report accuracy before/after on a bundled dataset")
    compress.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    compress.set_defaults(func=_compress)

    passes = sub.add_parser("passes", help="list the registered passes and their options")
    passes.set_defaults(func=_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return args.func(args)
    except TensorfoldError as e:
        print(f"tensorfold: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
