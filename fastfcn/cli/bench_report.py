"""``fastfcn bench-report [RESULTS...] [--markdown OUT.md] [--png OUT.png]``: stored benchmark
results as tables (stdout, markdown) and a chart (``fastfcn.bench_report``)."""

from __future__ import annotations

from pathlib import Path

from ..bench_report import DEFAULT_DIR, chart, load, markdown
from ..errors import InputError


def add_arguments(parser, command: str) -> None:
    parser.add_argument(
        "results", nargs="*", metavar="RESULTS",
        help="result files or folders (default: benchmarks/results/)",
    )  # fmt: skip
    parser.add_argument("--markdown", metavar="OUT.md", help="also write the table to this file")
    parser.add_argument("--png", metavar="OUT.png", help="write a bar chart of ms per image (Pillow)")


def main(args) -> int:
    from ..paths import check_output_file

    for option, path in (("--markdown", args.markdown), ("--png", args.png)):
        if path:
            check_output_file(path, option)
    devices = load(args.results)
    if not devices:
        raise InputError(f"no result files in {', '.join(args.results) or DEFAULT_DIR}; "
                         "expected .json files written by the benchmark suite")
    text = markdown(devices)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    if args.png:
        chart(devices, args.png)
        print(f"chart: {args.png}")
    return 0
