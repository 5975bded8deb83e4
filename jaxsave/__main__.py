"""The ``jaxsave`` command line.

Each subcommand is one ``_cmd_<name>(args) -> int`` function, registered in
:func:`build_parser` by one ``_add_<name>(subparsers)`` function.

>>> main(["inspect", "/no/such/file.h5"])
2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from jaxsave.errors import JaxsaveError

Command = Callable[[argparse.Namespace], int]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from jaxsave._store import schema
    from jaxsave.samples import file_info

    info = file_info(args.path, storage_options=args.storage_options)
    out = sys.stdout
    print(f"file:     {info.path}", file=out)  # a Zarr store's directory or URL
    print(
        f"format:   jaxsave format {info.format} (written by jaxsave {info.version}), layout {info.layout!r}",
        file=out,
    )
    print(f"created:  {info.created}", file=out)
    if info.open_for_writing:
        print(
            "state:    open for writing: a sampler is still writing it, or was killed "
            "(then `jaxsave recover` lets other readers open it)",
            file=out,
        )
    counts = info.sample_counts.tolist()
    print(f"chains:   {info.chains}", file=out)
    print(f"samples:  {counts} (total {sum(counts)})", file=out)
    if not info.variables:
        print("variables: none (no chain was registered)", file=out)
        return 0
    rows = [("variable", "group", "shape per draw", "dtype")]
    rows += [
        (v.name, v.group.replace(schema.CHAIN_GROUP, schema.ANY_CHAIN_GROUP), str(v.shape), v.dtype)
        for v in info.variables
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print("variables:", file=out)
    for r in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip(), file=out)
    return 0


def _storage_options(text: str) -> dict:
    """``--storage-options``: a JSON object of fsspec options."""
    try:
        options = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from error
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of fsspec options, got {text!r}")
    return options


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        type=_storage_options,
        default=None,
        metavar="JSON",
        help='fsspec options for a Zarr store URL, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="show chains, variables, shapes, dtypes and sample counts of a file"
    )
    p.add_argument(
        "path", help="a sample file (HDF5Collector) or store (ZarrCollector: a directory or a URL)"
    )
    _add_storage_options(p)
    p.set_defaults(command=_cmd_inspect)


def _cmd_recover(args: argparse.Namespace) -> int:
    from jaxsave.samples import recover

    changed = recover(args.path, storage_options=args.storage_options)
    print(f"{args.path}: {'cleared the open-for-writing mark' if changed else 'nothing to recover'}")
    return 0


def _add_recover(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("recover", help="make the file of a killed sampler readable by xarray/h5py")
    p.add_argument("path")
    _add_storage_options(p)
    p.set_defaults(command=_cmd_recover)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    from jaxsave import demo

    p = subparsers.add_parser(
        "demo",
        help="run SGLD on real data with 4 chains, stream to chains.h5, print a summary",
        description=(demo.__doc__ or "").split("\n\n")[0],
    )
    demo.add_arguments(p)
    p.set_defaults(command=demo.run_from_args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; add a subcommand with one ``_add_<name>`` function."""
    parser = argparse.ArgumentParser(prog="jaxsave", description="Inspect and manage jaxsave files.")
    subparsers = parser.add_subparsers(dest="subcommand", required=True)
    for add in (_add_inspect, _add_recover, _add_demo):
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 on a bad file or usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    try:
        return command(args)
    except (JaxsaveError, OSError, TypeError) as error:
        print(f"jaxsave {args.subcommand}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
