"""The `attnfuse` command line.

Exit codes: 0 success; 1 bad input (missing, truncated or non-ONNX model, unwritable
output, bad option); 2 verification failed (nothing written); 3 internal error.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from tqdm import tqdm

from attnfuse.optimizer import io, openvino_run
from attnfuse.optimizer.api import STAGES, inspect_onnx, make_config, optimize_onnx
from attnfuse.optimizer.config import PRECISIONS, TARGETS
from attnfuse.optimizer.errors import UserError, VerificationError, first_line
from attnfuse.optimizer.quantize import SUBGRAPH_OPTION, unquantized_in_subgraphs
from attnfuse.optimizer.report import Check, Report
from attnfuse.core.modes import USAGE
from attnfuse.passes.onnx import padding_free, unpadded_branch

FORCE_HELP = (
    "write the output even when verification fails; the run then exits 0 "
    "and prints a warning with the measured error"
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(build_parser(), argv)
    except UserError as e:
        return _fail(str(e), 1)
    except VerificationError as e:
        return _fail(f"{e}; nothing written (--force writes it anyway)", 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:
        if os.environ.get("ATTNFUSE_DEBUG"):
            raise
        return _fail(f"internal error: {type(e).__name__}: {first_line(e)} (run with ATTNFUSE_DEBUG=1 for the traceback)", 3)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    # demo and bench take their own options; every other command takes only its own.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "module", None):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.args = extra
    return args.run(args)


def _fail(message: str, code: int) -> int:
    print(f"attnfuse: error: {' '.join(message.split())}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    """Bad usage is a UserError like any other: one line, exit code 1."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnfuse", description="Find attention in ONNX models and fuse it.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    optimize = commands.add_parser(
        "optimize",
        help="optimize an ONNX model",
        description="Optimize IN and write OUT, after checking OUT against IN on generated inputs. "
        "Exit codes: 0 written; 1 bad input or option; 2 verification failed, nothing written; 3 internal error.",
    )
    optimize.add_argument("model", metavar="IN.onnx")
    optimize.add_argument("-o", "--output", metavar="OUT.onnx", required=True)
    optimize.add_argument("--target", choices=TARGETS, default="ort-cpu",
                          help="where the model will run: ONNX Runtime (CPU, CUDA) or OpenVINO (standard ONNX ops only)")
    optimize.add_argument("--precision", choices=PRECISIONS, default="f32",
                          help="openvino: the precision it will compute in (its INFERENCE_PRECISION_HINT); the "
                               "model is verified at float32 and then at this precision's tolerance")
    optimize.add_argument("--report", metavar="REPORT.json", help="write the JSON report here")
    optimize.add_argument("--no-verify", action="store_true", help="skip the comparison with the original")
    optimize.add_argument("--force", action="store_true", help=FORCE_HELP)
    optimize.add_argument("--attention", default="exact", metavar="MODE",
                          help=f"{USAGE}; anything but exact is an opt-in approximation whose error is measured and reported")
    optimize.add_argument("--no-padding-free", action="store_true", help="keep padded tokens in the computation")
    optimize.add_argument("--quantize", metavar="int8|int4",
                          help="quantize the MatMuls' weights with ONNX Runtime's quantizers (int8: "
                               "quantize_dynamic, per channel, before the rewrites; int4: MatMulNBits, blocks of 32, "
                               "after them) and verify against IN quantized the same way, reporting the error against "
                               "IN; with --target openvino, int8 only, in the form --precision runs fastest (f32: "
                               "blocks of 32, OpenVINO quantizing the activations; bf16: per channel, widened once "
                               "when OpenVINO loads the file), verified there")
    optimize.add_argument("--reference", metavar="FP32.onnx",
                          help="the fp32 model a quantized IN was made from: the report gives the errors against it too")
    _input_shape_option(optimize)
    optimize.set_defaults(run=_optimize)

    inspect = commands.add_parser("inspect", help="list the attention sites and fusions found")
    inspect.add_argument("model", metavar="IN.onnx")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    _input_shape_option(inspect)
    inspect.set_defaults(run=_inspect)

    for name, module, summary in (("demo", "demo", "run the demo"), ("bench", "bench_command", "run the benchmarks")):
        delegate = commands.add_parser(name, help=summary, add_help=False)
        delegate.set_defaults(run=_delegate, module=f"attnfuse.tools.{module}")
    return parser


# --- optimize --------------------------------------------------------------


def _input_shape_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                        help="the shape to feed an input whose sizes the graph leaves open and attnfuse cannot "
                             "derive, e.g. pixel_values=1,3,224,224 (repeatable)")


def input_shapes(specs: list[str]) -> dict[str, list[int]]:
    """NAME=D1,D2,... (or D1xD2x...) for each spec."""
    shapes = {}
    for spec in specs:
        name, _, dims = spec.partition("=")
        try:
            shapes[name.strip()] = [int(d) for d in dims.replace("x", ",").split(",")]
        except ValueError:
            raise UserError(f"--input-shape {spec!r}: expected NAME=DIMS, e.g. pixel_values=1,3,224,224") from None
        if not name.strip() or any(d < 0 for d in shapes[name.strip()]):
            raise UserError(f"--input-shape {spec!r}: expected NAME=DIMS, e.g. pixel_values=1,3,224,224")
    return shapes


def _optimize(args: argparse.Namespace) -> int:
    # Fail on an unwritable output now, not after the slow part; the report then cannot be written either.
    for path in filter(None, (args.output, args.report)):
        io.check_writable(path)
    try:
        config = make_config(
            None,
            dict(
                target=args.target,
                verify=not args.no_verify,
                force=args.force,
                attention=args.attention,
                padding_free=not args.no_padding_free,
                input_shapes=input_shapes(args.input_shape),
                precision=args.precision,
                quantize=args.quantize,
                reference=args.reference,
            ),
        )
        with _StageBar() as stage:
            result = optimize_onnx(args.model, config, progress=stage)
            stage("save")
            result.save(args.output)
    except Exception as error:
        if args.report:
            _write_failure_report(args.report, args.model, error)
        raise
    if args.report:
        io.write_text(args.report, result.report.to_json())
    print(_summary(result.report, args.output))
    if result.report.quantize is None and unquantized_in_subgraphs(result.model):
        print(f"attnfuse: note: to quantize {args.output}, use --quantize int8|int4, or ONNX Runtime's quantize_dynamic "
              f"with {SUBGRAPH_OPTION}: its MatMuls are inside If branches")
    if config.int8_activations and openvino_run.has_bf16():
        # OpenVINO runs at bf16 by default on such a CPU, where this file's weights are widened at every run
        print("attnfuse: note: OpenVINO computes in bf16 by default on this CPU; --precision bf16 writes the int8 "
              "file that runs fastest there (the one written is for f32)")
    verify = result.report.verify
    if verify is not None and not verify.ok:  # only reached with --force
        print(f"attnfuse: warning: verification failed ({verify.message}); written anyway because of --force", file=sys.stderr)
    return 0


def _write_failure_report(path: str, model: str, error: BaseException) -> None:
    """The report of a run that did not write its model: why, in the same JSON as a success."""
    report = getattr(error, "report", None) or Report(model=model)
    if isinstance(error, UserError):
        report.status, message = "user_error", str(error)
    elif isinstance(error, VerificationError):
        report.status, message = "verification_failed", f"{error}; nothing written (--force writes it anyway)"
    else:
        report.status, message = "internal_error", f"{type(error).__name__}: {first_line(error)}"
    report.error = " ".join(message.split())
    try:
        io.write_text(path, report.to_json())
    except Exception:  # the run's own error is the one to show
        pass


class _StageBar:
    """A progress bar over the stages of a run, on stderr when it is a terminal."""

    STAGES = (*STAGES, "save")

    def __enter__(self) -> _StageBar:
        self.bar = tqdm(total=len(self.STAGES), file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
        self.started = False
        return self

    def __call__(self, stage: str) -> None:
        if stage in self.STAGES:
            self.bar.update(int(self.started))  # the previous stage is done
            self.started = True
        self.bar.set_description(stage)

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _summary(report: Report, output: str) -> str:
    ops = ", ".join(f"{op} x{count}" for op, count in sorted(report.fused_ops.items())) or "none"
    verify = report.verify
    if verify is None:
        checked = "skipped (--no-verify)"
    elif report.attention_mode != "exact":
        checked = verify.message
    else:
        checked = (
            f"{'ok' if verify.ok else 'FAILED'}, {_check_names[verify.check]}max abs error {verify.max_abs_error:.3g}, "
            f"max rel error {verify.max_rel_error:.3g} (tolerance {verify.tolerance:g})"
        )
        checked += "".join(f"; {other.describe()}" for other in verify.against)
    quantized = [f"quantized MatMuls: {report.quantized_matmuls} ({report.quantize or 'as given'}), "
                 f"{report.float_matmuls} with float weights"] if report.quantized_matmuls else []
    if report.float_activation_reads:
        quantized.append(f"static quantization: kept on the int8 MatMuls' activations; "
                         f"{report.float_activation_reads} other reads of a quantized activation read it in float")
    lines = [
        f"attention fused: {report.attention_fused}/{report.attention_total}",
        f"fused ops: {ops}",
        *quantized,
        f"padding-free: {_padding_free(report)}",
        f"verify: {checked}",
    ]
    if report.verify_precision is not None:
        lines.append(f"verify {report.verify_precision.precision}: "
                     f"{'ok' if report.verify_precision.ok else 'FAILED'}, {report.verify_precision.message}")
    return "\n".join([*lines, f"wrote {output} in {report.seconds:.2f} s"])


_check_names = {Check.DIRECT: "", Check.TWIN: "twin check (activation quantization removed): "}


def _padding_free(report: Report) -> str:
    fusions = {f.name: f for f in report.fusions}
    packed, branch = fusions.get(padding_free.NAME), fusions.get(unpadded_branch.NAME)
    if packed is None:
        return "off"
    if not packed.fused:
        return _fused(False, packed.reason)
    return "yes; a batch without padding runs the fused graph" if branch and branch.fused else "yes"


# --- inspect ---------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_onnx(args.model, input_shapes=input_shapes(args.input_shape))
    print(report.to_json() if args.json else _inspect_tables(report))
    return 0


def _inspect_tables(report: Report) -> str:
    sites = _table(
        ["attention site", "heads", "kv heads", "head size", "mask", "causal", "window", "bias", "cache", "softcap",
         "rotary", "fused"],
        [
            [s.name, s.num_heads, s.kv_heads or s.num_heads, s.head_size, s.mask, "yes" if s.causal else "no",
             _window(s.window), s.bias, s.cache, f"{s.softcap:g}" if s.softcap else "-", _rotary(s),
             _fused(s.fused, s.reason)]
            for s in report.sites
        ],
    )
    fusions = _table(["fusion", "op", "fused"], [[f.name, f.op, _fused(f.fused, f.reason)] for f in report.fusions])
    return f"{sites}\n\n{fusions}"


def _window(window: tuple[int, int]) -> str:
    return "-" if tuple(window) == (-1, -1) else f"{window[0]},{window[1]}"


def _rotary(site) -> str:
    if site.rotary is None:
        return "-"
    return f"{site.rotary.kind} {site.rotary.dim}/{site.head_size}"


def _fused(fused: bool, reason: str | None) -> str:
    return "yes" if fused else f"no: {reason or 'unknown reason'}"


def _table(header: list[str], rows: list[list[object]]) -> str:
    if not rows:
        return f"{header[0]}: none found"
    cells = [header, *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


# --- demo, bench -----------------------------------------------------------


def _delegate(args: argparse.Namespace) -> int:
    """Run attnfuse.tools.demo / .bench_command, which are imported only when asked for."""
    try:
        module = importlib.import_module(args.module)
    except ImportError as e:
        raise UserError(f"{args.command} is not available: {first_line(e)}") from None
    return module.main(args.args) or 0


if __name__ == "__main__":
    sys.exit(main())
